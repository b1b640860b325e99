//! The key handshake (`vstream_wire::auth`) on a live stream, before the first HELLO.
//!
//! Both functions return the bytes they read past the handshake: the start of the peer's mux
//! traffic, to be passed on as the `prefix` of [`crate::read_hello`] or [`crate::Mux::run_link`].

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use vstream_wire::auth::{self, AuthError, Challenge, Claim, Key, Side, NONCE_LEN, PROOF_LEN};

/// The most bytes a handshake message can take (a CLAIM with a 64-byte name); a peer that sends
/// more without completing one is not speaking the handshake.
const MAX_MESSAGE: usize = auth::MAGIC.len() + 1 + auth::MAX_NAME + NONCE_LEN;

/// A fresh nonce for the handshake, from the kernel's CRNG. Unlike session ids this waits for
/// the CRNG to be ready: a predictable nonce would let a recorded handshake be replayed. Only
/// links with a key pay that wait.
pub fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut buf = [0u8; NONCE_LEN];
    let mut filled = 0;
    while filled < NONCE_LEN {
        match rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(buf)
}

/// Reads a key file: at least 16 bytes, trailing white space ignored
/// ([`Key::from_file_contents`]). Errors name the file.
pub fn read_key_file(path: &std::path::Path) -> io::Result<Key> {
    let bytes = std::fs::read(path)
        .map_err(|e| io::Error::new(e.kind(), format!("key file {}: {e}", path.display())))?;
    Key::from_file_contents(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("key file {}: {e}", path.display()),
        )
    })
}

/// Proves to the acceptor that we hold `key` for `name`, after checking that it holds it too.
pub async fn connector<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    name: &str,
    key: &Key,
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let nonce = self::nonce()?;
    let exchange = async {
        stream
            .write_all(
                &Claim {
                    name: name.to_owned(),
                    nonce,
                }
                .encode(),
            )
            .await?;
        let mut buf = Vec::new();
        let (peer_nonce, proof) = match read_message(stream, &mut buf, Challenge::parse).await? {
            Challenge::Accept { nonce, proof } => (nonce, proof),
            Challenge::Refuse(reason) => return Err(auth_error(AuthError::Refused(reason))),
        };
        if !key.verify(Side::Acceptor, name, &nonce, &peer_nonce, &proof) {
            return Err(auth_error(AuthError::WrongKey));
        }
        stream
            .write_all(&key.proof(Side::Connector, name, &nonce, &peer_nonce))
            .await?;
        stream.flush().await?;
        match read_message(stream, &mut buf, auth::parse_verdict).await? {
            None => Ok(buf),
            Some(reason) => Err(auth_error(AuthError::Refused(reason))),
        }
    };
    with_timeout(timeout, exchange).await
}

/// Checks that the connector holds the key of the guest it names. `first` holds bytes already
/// read from the stream (the start of the CLAIM); `key_for` gives the named guest's key, or why
/// not (an error whose message the connector is told). Returns the proven name and the bytes read
/// past the handshake.
pub async fn acceptor<S, F, E>(
    stream: &mut S,
    first: Vec<u8>,
    key_for: F,
    timeout: Duration,
) -> io::Result<(String, Vec<u8>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&str) -> Result<Key, E>,
    E: std::fmt::Display,
{
    let nonce = self::nonce()?;
    let exchange = async {
        let mut buf = first;
        let claim = read_message(stream, &mut buf, Claim::parse).await?;
        let key = match key_for(&claim.name) {
            Ok(key) => key,
            Err(reason) => {
                let reason = reason.to_string();
                stream
                    .write_all(&Challenge::Refuse(reason.clone()).encode())
                    .await?;
                return Err(auth_error(AuthError::Refused(reason)));
            }
        };
        let proof = key.proof(Side::Acceptor, &claim.name, &claim.nonce, &nonce);
        stream
            .write_all(&Challenge::Accept { nonce, proof }.encode())
            .await?;
        stream.flush().await?;
        let response = read_message(stream, &mut buf, |b| {
            Ok(b.get(..PROOF_LEN).map(|p| {
                let mut proof = [0; PROOF_LEN];
                proof.copy_from_slice(p);
                (proof, PROOF_LEN)
            }))
        })
        .await?;
        if !key.verify(
            Side::Connector,
            &claim.name,
            &claim.nonce,
            &nonce,
            &response,
        ) {
            // Say no more than that: the connector learns nothing about the key.
            stream
                .write_all(&auth::encode_verdict(Some("wrong key")))
                .await?;
            return Err(auth_error(AuthError::WrongKey));
        }
        stream.write_all(&auth::encode_verdict(None)).await?;
        stream.flush().await?;
        Ok((claim.name, buf))
    };
    with_timeout(timeout, exchange).await
}

/// Reads until `parse` finds a whole message at the start of `buf`, which it then removes.
async fn read_message<S, T, P>(stream: &mut S, buf: &mut Vec<u8>, parse: P) -> io::Result<T>
where
    S: AsyncRead + Unpin,
    P: Fn(&[u8]) -> Result<Option<(T, usize)>, AuthError>,
{
    loop {
        if let Some((message, used)) = parse(buf).map_err(auth_error)? {
            buf.drain(..used);
            return Ok(message);
        }
        if buf.len() > MAX_MESSAGE {
            return Err(auth_error(AuthError::Malformed {
                expected: "a message of the key handshake",
            }));
        }
        let mut chunk = [0u8; 256];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the key handshake",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn auth_error(e: AuthError) -> io::Error {
    let kind = match e {
        AuthError::Refused(_) | AuthError::WrongKey => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, format!("key handshake: {e}"))
}

async fn with_timeout<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(timeout, f)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "key handshake: no answer in time"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Key {
        Key::new(s.as_bytes().to_vec()).expect("key")
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn the_same_key_passes_and_the_mux_bytes_after_it_are_kept() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let k = key("a key of sixteen+ bytes");
        let k2 = k.clone();
        let acc = tokio::spawn(async move {
            let first = vec![];
            let r = acceptor(
                &mut b,
                first,
                |n| {
                    if n == "lab" {
                        Ok(k2)
                    } else {
                        Err("unknown")
                    }
                },
                T,
            )
            .await;
            b.write_all(b"\xA9\x5Chello").await.expect("write");
            r
        });
        let rest = connector(&mut a, "lab", &k, T).await.expect("accepted");
        let (name, left) = acc.await.expect("join").expect("accepted");
        assert_eq!(name, "lab");
        assert!(left.is_empty());
        let mut got = rest;
        while got.len() < 7 {
            let mut c = [0; 16];
            let n = a.read(&mut c).await.expect("read");
            got.extend_from_slice(&c[..n]);
        }
        assert_eq!(got, b"\xA9\x5Chello");
    }

    #[tokio::test]
    async fn a_wrong_key_or_an_unknown_name_is_refused_with_a_reason_on_both_sides() {
        for (claimed, theirs) in [
            ("lab", "another key, 16+ bytes"),
            ("nobody", "a key of sixteen+ bytes"),
        ] {
            let (mut a, mut b) = tokio::io::duplex(4096);
            let ours = key("a key of sixteen+ bytes");
            let acc = tokio::spawn(async move {
                acceptor(
                    &mut b,
                    vec![],
                    |n| {
                        if n == "lab" {
                            Ok(ours)
                        } else {
                            Err(format!("no guest {n:?} has a key"))
                        }
                    },
                    T,
                )
                .await
            });
            let e = connector(&mut a, claimed, &key(theirs), T)
                .await
                .expect_err("refused");
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            drop(a);
            let a_err = acc.await.expect("join").expect_err("refused");
            if claimed == "nobody" {
                assert!(
                    e.to_string().contains("no guest \"nobody\" has a key"),
                    "{e}"
                );
                assert_eq!(a_err.kind(), io::ErrorKind::PermissionDenied, "{a_err}");
            } else {
                // The connector stops at the acceptor's proof: it never proves anything itself,
                // and hangs up.
                assert!(e.to_string().contains("does not hold"), "{e}");
                assert_eq!(a_err.kind(), io::ErrorKind::UnexpectedEof, "{a_err}");
            }
        }
    }

    #[tokio::test]
    async fn garbage_and_silence_end_the_handshake() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("write");
        let e = acceptor(&mut b, vec![], |_| Err("x"), T)
            .await
            .expect_err("garbage");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let (_a, mut b) = tokio::io::duplex(4096);
        let e = acceptor(&mut b, vec![], |_| Err("x"), Duration::from_millis(50))
            .await
            .expect_err("silence");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
