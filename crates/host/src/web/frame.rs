//! How a console travels over the page's WebSocket: the console's bytes as binary messages
//! both ways (output to the page, keys to the guest), untouched (a console is not UTF-8 text:
//! a multi-byte character may be split between two reads); control as JSON text messages:
//! the page sends `{"type":"resize","cols":C,"rows":R}`, the daemon sends
//! `{"type":"attached","writer":W}` first (or `{"type":"error","error":...}`), and a shell's
//! socket ends with `{"type":"exit","message":...}`, how the shell ended.

use axum::extract::ws::Message;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use vstream_devices::term::WindowSize;

use crate::control::Reply;

/// Largest message a page may send (keys, a paste, a resize).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Largest terminal side accepted in a resize.
const MAX_SIDE: u16 = 1000;

/// What a message from the page means.
#[derive(Debug, PartialEq, Eq)]
pub enum FromPage {
    /// Keys (or a paste) for the guest.
    Keys(Bytes),
    /// The page's terminal has this size now.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// The page closed the socket.
    Close,
    /// A ping or pong (the WebSocket layer answers pings itself).
    Keepalive,
}

/// A text message the page may send.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
enum Control {
    Resize { cols: u16, rows: u16 },
}

/// Decodes a message from the page; an error says what was wrong with it.
pub fn decode(msg: Message) -> Result<FromPage, String> {
    match msg {
        Message::Binary(keys) => Ok(FromPage::Keys(keys)),
        Message::Text(text) => match serde_json::from_str(text.as_str()) {
            Ok(Control::Resize { cols, rows }) => {
                window_size(cols, rows).map(|_| FromPage::Resize { cols, rows })
            }
            Err(e) => Err(format!("bad control message: {e}")),
        },
        Message::Close(_) => Ok(FromPage::Close),
        Message::Ping(_) | Message::Pong(_) => Ok(FromPage::Keepalive),
    }
}

/// A terminal size from the page, if each side is 1 to [`MAX_SIDE`].
pub fn window_size(cols: u16, rows: u16) -> Result<WindowSize, String> {
    if (1..=MAX_SIDE).contains(&cols) && (1..=MAX_SIDE).contains(&rows) {
        Ok(WindowSize { rows, cols })
    } else {
        Err(format!(
            "resize to {cols}x{rows}: each side must be 1 to {MAX_SIDE}"
        ))
    }
}

/// The last message of a shell: how it ended (then the daemon closes the socket).
pub fn ended(how: &str) -> Message {
    Message::Text(json!({ "type": "exit", "message": how }).to_string().into())
}

/// Console output for the page.
pub fn output(bytes: &[u8]) -> Message {
    Message::Binary(Bytes::copy_from_slice(bytes))
}

/// The first message: whether the page may type, or why it is not attached.
pub fn attached(reply: &Reply) -> Message {
    let v = match (&reply.error, reply.ok) {
        (None, true) => json!({ "type": "attached", "writer": reply.writer == Some(true) }),
        (e, _) => json!({ "type": "error", "error": e.as_deref().unwrap_or("refused") }),
    };
    Message::Text(v.to_string().into())
}

/// An error for the page (then the daemon closes the socket).
pub fn error(why: &str) -> Message {
    Message::Text(json!({ "type": "error", "error": why }).to_string().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_bytes_are_binary_both_ways_and_untouched() {
        // Half of a UTF-8 character and a raw escape: bytes, not text.
        let raw = [0xe2, 0x82, 0x1b, b'[', b'H', 0xff];
        match output(&raw) {
            Message::Binary(b) => assert_eq!(&b[..], &raw),
            other => panic!("output must be a binary message, got {other:?}"),
        }
        let keys = decode(Message::Binary(Bytes::from_static(b"echo hi\r")));
        assert_eq!(keys, Ok(FromPage::Keys(Bytes::from_static(b"echo hi\r"))));
    }

    #[test]
    fn resize_is_a_json_text_message_with_bounded_sides() {
        let msg = |s: &str| Message::Text(s.to_owned().into());
        assert_eq!(
            decode(msg(r#"{"type":"resize","cols":120,"rows":40}"#)),
            Ok(FromPage::Resize {
                cols: 120,
                rows: 40
            })
        );
        for bad in [
            r#"{"type":"resize","cols":0,"rows":40}"#,
            r#"{"type":"resize","cols":120,"rows":5000}"#,
            r#"{"type":"resize","cols":-1,"rows":40}"#,
            r#"{"type":"resize","cols":80}"#,
            r#"{"type":"paste","data":"x"}"#,
            "echo typed as text",
        ] {
            assert!(decode(msg(bad)).is_err(), "{bad} must be refused");
        }
        assert_eq!(decode(Message::Close(None)), Ok(FromPage::Close));
    }

    #[test]
    fn the_first_message_says_whether_the_page_may_type() {
        let text = |m: Message| match m {
            Message::Text(t) => {
                serde_json::from_str::<serde_json::Value>(t.as_str()).expect("json")
            }
            other => panic!("control messages are text, got {other:?}"),
        };
        let writer = Reply {
            writer: Some(true),
            ..Reply::ok()
        };
        assert_eq!(
            text(attached(&writer)),
            json!({"type": "attached", "writer": true})
        );
        let watcher = Reply {
            writer: Some(false),
            ..Reply::ok()
        };
        assert_eq!(text(attached(&watcher))["writer"], false);
        let refused = text(attached(&Reply::error("no console \"x\"")));
        assert_eq!(refused["type"], "error");
        assert_eq!(refused["error"], "no console \"x\"");
    }
}
