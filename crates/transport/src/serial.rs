//! The `serial:DEVICE[,baud=N][,rtscts]` transport: a tty in raw mode.
//!
//! Opening sets the line to what `cfmakeraw` gives (no echo, no signals, no line editing, no
//! CR/LF translation, no XON/XOFF), 8 data bits, no parity, 1 stop bit, `CLOCAL | CREAD`,
//! `VMIN = 1, VTIME = 0`, the requested speed and, with `rtscts`, hardware flow control; then it
//! discards whatever was queued before. Every call to `Endpoint::next` opens the device afresh.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::termios::{
    tcflush, tcgetattr, tcsetattr, ControlModes, InputModes, OptionalActions, QueueSelector,
    SpecialCodeIndex,
};

use crate::address::{Address, SerialConfig};
use crate::fd::FdStream;
use crate::{with_context, Connection, PeerIdentity};

/// Opens and sets up the serial line `config` names.
pub(crate) fn open(addr: &Address, config: &SerialConfig) -> io::Result<Connection> {
    let fd: OwnedFd = rustix::fs::open(
        &config.device,
        OFlags::RDWR | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
    .map_err(with_context(addr, "cannot open the serial device"))?;
    if !rustix::termios::isatty(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{addr}: {} is not a terminal device",
                config.device.display()
            ),
        ));
    }
    configure(&fd, config).map_err(with_context(addr, "cannot set up the serial line"))?;
    tcflush(&fd, QueueSelector::IOFlush)
        .map_err(io::Error::from)
        .map_err(with_context(addr, "cannot flush the serial line"))?;
    let stream = FdStream::new(fd, true)
        .map_err(with_context(addr, "cannot use the serial device"))?
        .filling_reads();
    tracing::debug!(%addr, "serial line open");
    Ok(Connection {
        stream: Box::new(stream),
        peer: config.device.display().to_string(),
        identity: PeerIdentity::Opened,
    })
}

/// Puts the tty into raw 8N1 mode at the configured speed.
pub(crate) fn configure(fd: impl AsFd, config: &SerialConfig) -> io::Result<()> {
    let mut termios = tcgetattr(&fd)?;
    termios.make_raw();
    // make_raw clears IXON; software flow control must be off both ways for binary data.
    termios.input_modes -= InputModes::IXOFF | InputModes::IXANY;
    termios.control_modes -= ControlModes::CSIZE | ControlModes::PARENB | ControlModes::CSTOPB;
    termios.control_modes |= ControlModes::CS8 | ControlModes::CLOCAL | ControlModes::CREAD;
    if config.rtscts {
        termios.control_modes |= ControlModes::CRTSCTS;
    } else {
        termios.control_modes -= ControlModes::CRTSCTS;
    }
    termios.special_codes[SpecialCodeIndex::VMIN] = 1;
    termios.special_codes[SpecialCodeIndex::VTIME] = 0;
    termios.set_speed(config.baud)?;
    tcsetattr(&fd, OptionalActions::Now, &termios)?;
    // tcsetattr succeeds if any part applied; drivers may round an odd speed.
    let applied = tcgetattr(&fd)?;
    if applied.output_speed() != config.baud {
        tracing::warn!(
            device = %config.device.display(),
            requested = config.baud,
            applied = applied.output_speed(),
            "the serial driver did not take the requested speed exactly"
        );
    }
    Ok(())
}
