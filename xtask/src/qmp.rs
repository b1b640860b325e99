//! A minimal QMP client: one connection per command, on the lab's own monitor socket.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

fn read_reply(reader: &mut BufReader<UnixStream>, what: &str) -> io::Result<Value> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("QMP closed the connection while waiting for the reply to {what}"),
            ));
        }
        let msg: Value = serde_json::from_str(line.trim()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("QMP sent non-JSON {line:?}: {e}"),
            )
        })?;
        if let Some(ret) = msg.get("return") {
            return Ok(ret.clone());
        }
        if let Some(err) = msg.get("error") {
            return Err(io::Error::other(format!(
                "QMP {what} failed: {} ({})",
                err.get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no description"),
                err.get("class")
                    .and_then(Value::as_str)
                    .unwrap_or("no class")
            )));
        }
        // Greeting ({"QMP":...}) and events are skipped.
    }
}

/// Runs one QMP command on the monitor at `socket` and returns its `return` value.
pub fn execute(
    socket: &Path,
    command: &str,
    arguments: Option<Value>,
    timeout: Duration,
) -> io::Result<Value> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("connecting to QMP at {}: {e}", socket.display()),
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);

    let mut greeting = String::new();
    reader.read_line(&mut greeting)?;
    if !greeting.contains("\"QMP\"") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a QMP monitor (greeting {greeting:?})",
                socket.display()
            ),
        ));
    }
    writer.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    read_reply(&mut reader, "qmp_capabilities")?;

    let mut request = json!({ "execute": command });
    if let Some(args) = arguments {
        request["arguments"] = args;
    }
    writer.write_all(format!("{request}\n").as_bytes())?;
    read_reply(&mut reader, command)
}
