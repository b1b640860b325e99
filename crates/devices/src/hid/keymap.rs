//! The keyboard: its keys (the capabilities of the guest's uinput keyboard), their names for
//! `vstreamctl input GUEST key COMBO`, and the US layout that turns text into key presses for
//! `vstreamctl input GUEST type TEXT`.
//!
//! Typing a character is: shift press (if the US layout needs shift), key press, key release,
//! shift release, each its own report. `\n` (and `\r`, a `\r\n` pair counting once) is Enter,
//! `\t` is Tab. Any other character without a key on a US keyboard is an error before anything
//! is sent.

use super::{codes::EV_KEY, Event};

/// Linux key codes (linux/input-event-codes.h).
#[allow(missing_docs)]
pub mod key {
    pub const ESC: u16 = 1;
    pub const N1: u16 = 2;
    pub const N0: u16 = 11;
    pub const MINUS: u16 = 12;
    pub const EQUAL: u16 = 13;
    pub const BACKSPACE: u16 = 14;
    pub const TAB: u16 = 15;
    pub const LEFTBRACE: u16 = 26;
    pub const RIGHTBRACE: u16 = 27;
    pub const ENTER: u16 = 28;
    pub const LEFTCTRL: u16 = 29;
    pub const SEMICOLON: u16 = 39;
    pub const APOSTROPHE: u16 = 40;
    pub const GRAVE: u16 = 41;
    pub const LEFTSHIFT: u16 = 42;
    pub const BACKSLASH: u16 = 43;
    pub const COMMA: u16 = 51;
    pub const DOT: u16 = 52;
    pub const SLASH: u16 = 53;
    pub const RIGHTSHIFT: u16 = 54;
    pub const LEFTALT: u16 = 56;
    pub const SPACE: u16 = 57;
    pub const CAPSLOCK: u16 = 58;
    pub const F1: u16 = 59;
    pub const F10: u16 = 68;
    pub const NUMLOCK: u16 = 69;
    pub const SCROLLLOCK: u16 = 70;
    pub const F11: u16 = 87;
    pub const F12: u16 = 88;
    pub const RIGHTCTRL: u16 = 97;
    pub const SYSRQ: u16 = 99;
    pub const RIGHTALT: u16 = 100;
    pub const HOME: u16 = 102;
    pub const UP: u16 = 103;
    pub const PAGEUP: u16 = 104;
    pub const LEFT: u16 = 105;
    pub const RIGHT: u16 = 106;
    pub const END: u16 = 107;
    pub const DOWN: u16 = 108;
    pub const PAGEDOWN: u16 = 109;
    pub const INSERT: u16 = 110;
    pub const DELETE: u16 = 111;
    pub const MUTE: u16 = 113;
    pub const VOLUMEDOWN: u16 = 114;
    pub const VOLUMEUP: u16 = 115;
    pub const PAUSE: u16 = 119;
    pub const LEFTMETA: u16 = 125;
    pub const RIGHTMETA: u16 = 126;
    pub const COMPOSE: u16 = 127;
    pub const F13: u16 = 183;
    pub const F24: u16 = 194;
}

/// Letters in key-code order rows (QWERTY rows as the kernel numbers them).
const LETTERS: [(char, u16); 26] = [
    ('q', 16),
    ('w', 17),
    ('e', 18),
    ('r', 19),
    ('t', 20),
    ('y', 21),
    ('u', 22),
    ('i', 23),
    ('o', 24),
    ('p', 25),
    ('a', 30),
    ('s', 31),
    ('d', 32),
    ('f', 33),
    ('g', 34),
    ('h', 35),
    ('j', 36),
    ('k', 37),
    ('l', 38),
    ('z', 44),
    ('x', 45),
    ('c', 46),
    ('v', 47),
    ('b', 48),
    ('n', 49),
    ('m', 50),
];

/// The US layout's symbol keys: (unshifted, shifted, key).
const SYMBOLS: [(char, char, u16); 21] = [
    ('1', '!', key::N1),
    ('2', '@', 3),
    ('3', '#', 4),
    ('4', '$', 5),
    ('5', '%', 6),
    ('6', '^', 7),
    ('7', '&', 8),
    ('8', '*', 9),
    ('9', '(', 10),
    ('0', ')', key::N0),
    ('-', '_', key::MINUS),
    ('=', '+', key::EQUAL),
    ('[', '{', key::LEFTBRACE),
    (']', '}', key::RIGHTBRACE),
    ('\\', '|', key::BACKSLASH),
    (';', ':', key::SEMICOLON),
    ('\'', '"', key::APOSTROPHE),
    ('`', '~', key::GRAVE),
    (',', '<', key::COMMA),
    ('.', '>', key::DOT),
    ('/', '?', key::SLASH),
];

/// Named keys for combos (lower case; letters, digits and unshifted symbols are also accepted
/// as themselves). The guest keyboard has exactly these keys plus the letters and symbols.
const NAMED: &[(&str, u16)] = &[
    ("ctrl", key::LEFTCTRL),
    ("control", key::LEFTCTRL),
    ("lctrl", key::LEFTCTRL),
    ("rctrl", key::RIGHTCTRL),
    ("shift", key::LEFTSHIFT),
    ("lshift", key::LEFTSHIFT),
    ("rshift", key::RIGHTSHIFT),
    ("alt", key::LEFTALT),
    ("lalt", key::LEFTALT),
    ("ralt", key::RIGHTALT),
    ("altgr", key::RIGHTALT),
    ("meta", key::LEFTMETA),
    ("super", key::LEFTMETA),
    ("win", key::LEFTMETA),
    ("lmeta", key::LEFTMETA),
    ("rmeta", key::RIGHTMETA),
    ("esc", key::ESC),
    ("escape", key::ESC),
    ("enter", key::ENTER),
    ("return", key::ENTER),
    ("tab", key::TAB),
    ("space", key::SPACE),
    ("backspace", key::BACKSPACE),
    ("delete", key::DELETE),
    ("del", key::DELETE),
    ("insert", key::INSERT),
    ("ins", key::INSERT),
    ("home", key::HOME),
    ("end", key::END),
    ("pageup", key::PAGEUP),
    ("pgup", key::PAGEUP),
    ("pagedown", key::PAGEDOWN),
    ("pgdn", key::PAGEDOWN),
    ("up", key::UP),
    ("down", key::DOWN),
    ("left", key::LEFT),
    ("right", key::RIGHT),
    ("capslock", key::CAPSLOCK),
    ("numlock", key::NUMLOCK),
    ("scrolllock", key::SCROLLLOCK),
    ("sysrq", key::SYSRQ),
    ("print", key::SYSRQ),
    ("printscreen", key::SYSRQ),
    ("pause", key::PAUSE),
    ("menu", key::COMPOSE),
    ("compose", key::COMPOSE),
    ("mute", key::MUTE),
    ("volumedown", key::VOLUMEDOWN),
    ("volumeup", key::VOLUMEUP),
    ("minus", key::MINUS),
    ("equal", key::EQUAL),
    ("comma", key::COMMA),
    ("dot", key::DOT),
    ("period", key::DOT),
    ("slash", key::SLASH),
    ("backslash", key::BACKSLASH),
    ("semicolon", key::SEMICOLON),
    ("apostrophe", key::APOSTROPHE),
    ("grave", key::GRAVE),
    ("leftbrace", key::LEFTBRACE),
    ("rightbrace", key::RIGHTBRACE),
];

/// Function keys F1..F24 (F1-F10, F11-F12 and F13-F24 are three runs of codes).
fn function_key(n: u16) -> Option<u16> {
    match n {
        1..=10 => Some(key::F1 + n - 1),
        11 => Some(key::F11),
        12 => Some(key::F12),
        13..=24 => Some(key::F13 + n - 13),
        _ => None,
    }
}

/// Every key of the guest keyboard, sorted, without duplicates.
pub fn keyboard_keys() -> Vec<u16> {
    let mut keys: Vec<u16> = LETTERS.iter().map(|(_, k)| *k).collect();
    keys.extend(SYMBOLS.iter().map(|(_, _, k)| *k));
    keys.extend(NAMED.iter().map(|(_, k)| *k));
    keys.extend((1..=24).filter_map(function_key));
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Whether `code` is a key of the guest keyboard.
pub fn is_keyboard_key(code: u16) -> bool {
    LETTERS.iter().any(|(_, k)| *k == code)
        || SYMBOLS.iter().any(|(_, _, k)| *k == code)
        || NAMED.iter().any(|(_, k)| *k == code)
        || (1..=24).filter_map(function_key).any(|k| k == code)
}

/// The key for `c` on a US keyboard and whether it needs shift.
pub fn char_key(c: char) -> Option<(u16, bool)> {
    match c {
        '\n' | '\r' => return Some((key::ENTER, false)),
        '\t' => return Some((key::TAB, false)),
        ' ' => return Some((key::SPACE, false)),
        _ => {}
    }
    if let Some((_, k)) = LETTERS.iter().find(|(l, _)| *l == c) {
        return Some((*k, false));
    }
    if let Some((_, k)) = LETTERS.iter().find(|(l, _)| l.to_ascii_uppercase() == c) {
        return Some((*k, true));
    }
    SYMBOLS.iter().find_map(|(plain, shifted, k)| {
        if *plain == c {
            Some((*k, false))
        } else if *shifted == c {
            Some((*k, true))
        } else {
            None
        }
    })
}

/// Why a text or combo cannot be typed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeymapError {
    /// A character with no key in the US layout.
    #[error("character {ch:?} (U+{code:04X}) at position {pos} has no key on a US keyboard")]
    NoKey {
        /// The character.
        ch: char,
        /// Its code point.
        code: u32,
        /// Its index in the text (in characters, from 0).
        pos: usize,
    },
    /// A combo part that is not a key name.
    #[error("{part:?} in {combo:?} is not a key name (try ctrl, shift, alt, altgr, meta, a-z, 0-9, f1-f24, enter, esc, tab, space, backspace, delete, home, end, pageup, pagedown, up, down, left, right, ...)")]
    UnknownKey {
        /// The part.
        part: String,
        /// The whole combo.
        combo: String,
    },
    /// An empty combo or part (`ctrl+`, `+`).
    #[error("{0:?} is not a key combination (KEY or MOD+...+KEY, e.g. ctrl+alt+f2)")]
    Empty(String),
}

/// One report per key transition for `text` (see the module documentation).
pub fn text_reports(text: &str) -> Result<Vec<Vec<Event>>, KeymapError> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    for (pos, &ch) in chars.iter().enumerate() {
        if ch == '\r' && chars.get(pos + 1) == Some(&'\n') {
            continue;
        }
        let (code, shift) = char_key(ch).ok_or(KeymapError::NoKey {
            ch,
            code: ch as u32,
            pos,
        })?;
        if shift {
            out.push(vec![Event::key(key::LEFTSHIFT, true)]);
        }
        out.push(vec![Event::key(code, true)]);
        out.push(vec![Event::key(code, false)]);
        if shift {
            out.push(vec![Event::key(key::LEFTSHIFT, false)]);
        }
    }
    Ok(out)
}

/// The key named `name` (case-insensitive): a name of the table, `f1`..`f24`, a letter, a
/// digit or an unshifted symbol.
pub fn key_by_name(name: &str) -> Option<u16> {
    let lower = name.to_ascii_lowercase();
    if let Some((_, k)) = NAMED.iter().find(|(n, _)| *n == lower) {
        return Some(*k);
    }
    if let Some(n) = lower.strip_prefix('f').and_then(|n| n.parse::<u16>().ok()) {
        return function_key(n);
    }
    let mut chars = lower.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => match char_key(c) {
            Some((k, false)) => Some(k),
            _ => None,
        },
        _ => None,
    }
}

/// Parses `ctrl+alt+f2`: the keys in press order.
pub fn parse_combo(combo: &str) -> Result<Vec<u16>, KeymapError> {
    if combo.is_empty() {
        return Err(KeymapError::Empty(combo.into()));
    }
    combo
        .split('+')
        .map(|part| {
            if part.is_empty() {
                return Err(KeymapError::Empty(combo.into()));
            }
            key_by_name(part).ok_or_else(|| KeymapError::UnknownKey {
                part: part.into(),
                combo: combo.into(),
            })
        })
        .collect()
}

/// Reports for a combo: each key pressed in order, then released in reverse order.
pub fn combo_reports(keys: &[u16]) -> Vec<Vec<Event>> {
    let mut out: Vec<Vec<Event>> = keys.iter().map(|k| vec![Event::key(*k, true)]).collect();
    out.extend(keys.iter().rev().map(|k| vec![Event::key(*k, false)]));
    out
}

/// Whether an `EV_KEY` event is a keyboard key (for routing forwarded events).
pub fn is_keyboard_event(ev: &Event) -> bool {
    ev.type_ == EV_KEY && is_keyboard_key(ev.code)
}
