//! A small QMP client: connect, negotiate capabilities, run one command, read its reply.
//!
//! QEMU's QMP socket serves one client at a time, and vstreamd needs it only when a watchdog
//! fires, so each action connects afresh. Reads are bounded ([`MAX_LINE`] per message,
//! [`MAX_MESSAGES`] per command) and the whole exchange has a timeout. The line splitting and
//! message classification are sans-io ([`LineReader`], [`classify`]).

use std::io;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vstream_transport::{Address, Endpoint};

/// Longest QMP message accepted (the replies we wait for are tiny).
pub const MAX_LINE: usize = 64 * 1024;

/// Most messages (events included) read while waiting for one reply.
pub const MAX_MESSAGES: usize = 1000;

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// The greeting, `{"QMP": {...}}`.
    Greeting,
    /// A command's success, `{"return": ...}`.
    Return(Value),
    /// A command's failure, `{"error": {"class": ..., "desc": ...}}`.
    Error {
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// An asynchronous event, `{"event": NAME, ...}`.
    Event(String),
}

/// Why QEMU's answer is not what QMP promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QmpError {
    /// A line that is not a JSON object.
    #[error("QMP sent something that is not a JSON object: {0}")]
    NotJson(String),
    /// A JSON object of no known shape.
    #[error("QMP sent an object of unknown shape: {0}")]
    Unknown(String),
    /// A line above [`MAX_LINE`].
    #[error("QMP sent a message longer than {MAX_LINE} bytes")]
    TooLong,
}

fn excerpt(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(&line[..line.len().min(200)]);
    text.trim().to_owned()
}

/// Classifies one line (without its newline).
pub fn classify(line: &[u8]) -> Result<QmpMessage, QmpError> {
    let v: Value = serde_json::from_slice(line).map_err(|_| QmpError::NotJson(excerpt(line)))?;
    let Some(obj) = v.as_object() else {
        return Err(QmpError::NotJson(excerpt(line)));
    };
    if obj.contains_key("QMP") {
        return Ok(QmpMessage::Greeting);
    }
    if let Some(r) = obj.get("return") {
        return Ok(QmpMessage::Return(r.clone()));
    }
    if let Some(e) = obj.get("error") {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        return Ok(QmpMessage::Error {
            class: s("class"),
            desc: s("desc"),
        });
    }
    if let Some(name) = obj.get("event").and_then(Value::as_str) {
        return Ok(QmpMessage::Event(name.to_owned()));
    }
    Err(QmpError::Unknown(excerpt(line)))
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub struct LineReader {
    buf: Vec<u8>,
}

impl LineReader {
    /// Appends bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete line (without `\n` or `\r\n`); an error once a line grows too long.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, QmpError> {
        match self.buf.iter().position(|b| *b == b'\n') {
            Some(i) if i > MAX_LINE => Err(QmpError::TooLong),
            Some(i) => {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Ok(Some(line))
            }
            None if self.buf.len() > MAX_LINE => Err(QmpError::TooLong),
            None => Ok(None),
        }
    }
}

struct Conn {
    stream: vstream_transport::BoxStream,
    lines: LineReader,
}

impl Conn {
    async fn message(&mut self) -> io::Result<QmpMessage> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(line) = self.lines.next_line().map_err(invalid)? {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return classify(&line).map_err(invalid);
            }
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "QMP closed the connection",
                ));
            }
            self.lines.push(&buf[..n]);
        }
    }

    /// Sends `request` and waits for its return (events are skipped).
    async fn execute(&mut self, what: &str, request: &Value) -> io::Result<Value> {
        let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
        line.push(b'\n');
        self.stream.write_all(&line).await?;
        self.stream.flush().await?;
        for _ in 0..MAX_MESSAGES {
            match self.message().await? {
                QmpMessage::Return(v) => return Ok(v),
                QmpMessage::Error { class, desc } => {
                    return Err(io::Error::other(format!(
                        "QMP {what} failed: {desc} ({class})"
                    )))
                }
                QmpMessage::Event(_) | QmpMessage::Greeting => {}
            }
        }
        Err(invalid(format!(
            "no reply to {what} within {MAX_MESSAGES} messages"
        )))
    }
}

fn invalid(e: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Connects to the QMP monitor at `address`, negotiates capabilities and runs `command` (with
/// `arguments`), all within `timeout`; returns the command's `return` value.
pub async fn execute(
    address: &Address,
    command: &str,
    arguments: Option<Value>,
    timeout: Duration,
) -> io::Result<Value> {
    let run = async {
        let mut ep = Endpoint::bind(address.clone()).await?;
        let conn = ep.next().await?;
        let mut c = Conn {
            stream: conn.stream,
            lines: LineReader::default(),
        };
        match c.message().await? {
            QmpMessage::Greeting => {}
            other => {
                return Err(invalid(format!(
                    "{address} is not a QMP monitor (first message {other:?})"
                )))
            }
        }
        c.execute("qmp_capabilities", &json!({"execute": "qmp_capabilities"}))
            .await?;
        let mut request = json!({ "execute": command });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        c.execute(command, &request).await
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r.map_err(|e| io::Error::new(e.kind(), format!("QMP {address}: {e}"))),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "QMP {address}: no reply to {command} within {} ms (is another client connected?)",
                timeout.as_millis()
            ),
        )),
    }
}
