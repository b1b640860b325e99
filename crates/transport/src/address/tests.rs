//! Address parsing and printing.

use super::*;

fn parse(text: &str) -> Address {
    match text.parse() {
        Ok(address) => address,
        Err(e) => panic!("{text:?} should parse: {e}"),
    }
}

fn parse_err(text: &str) -> AddressError {
    match text.parse::<Address>() {
        Ok(address) => panic!("{text:?} should not parse, got {address:?}"),
        Err(e) => e,
    }
}

#[test]
fn parses_every_form() {
    let cases: Vec<(&str, Address)> = vec![
        (
            "unix:/run/vstream.sock",
            Address::Unix("/run/vstream.sock".into()),
        ),
        (
            "unix:relative/x:y.sock",
            Address::Unix("relative/x:y.sock".into()),
        ),
        (
            "unix-listen:/tmp/a b",
            Address::UnixListen("/tmp/a b".into()),
        ),
        (
            "tcp:127.0.0.1:5555",
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 5555,
            },
        ),
        (
            "tcp:example.org:0",
            Address::Tcp {
                host: "example.org".into(),
                port: 0,
            },
        ),
        (
            "tcp:[::1]:65535",
            Address::Tcp {
                host: "::1".into(),
                port: 65535,
            },
        ),
        (
            "tcp-listen:0.0.0.0:7000",
            Address::TcpListen {
                host: "0.0.0.0".into(),
                port: 7000,
            },
        ),
        (
            "tcp-listen:[::]:7000",
            Address::TcpListen {
                host: "::".into(),
                port: 7000,
            },
        ),
        ("vsock:3:1234", Address::Vsock { cid: 3, port: 1234 }),
        (
            "vsock:4294967295:1",
            Address::Vsock {
                cid: u32::MAX,
                port: 1,
            },
        ),
        ("vsock-listen:1234", Address::VsockListen { port: 1234 }),
        (
            "hvsock:/run/fc/v.sock:52",
            Address::HybridVsock {
                path: "/run/fc/v.sock".into(),
                port: 52,
            },
        ),
        (
            "hvsock:/odd:path/v.sock:52",
            Address::HybridVsock {
                path: "/odd:path/v.sock".into(),
                port: 52,
            },
        ),
        (
            "serial:/dev/ttyS1",
            Address::Serial(SerialConfig::new("/dev/ttyS1")),
        ),
        (
            "serial:/dev/ttyUSB0,baud=9600",
            Address::Serial(SerialConfig {
                device: "/dev/ttyUSB0".into(),
                baud: 9600,
                rtscts: false,
            }),
        ),
        (
            "serial:/dev/ttyUSB0,rtscts,baud=3000000",
            Address::Serial(SerialConfig {
                device: "/dev/ttyUSB0".into(),
                baud: 3_000_000,
                rtscts: true,
            }),
        ),
        ("port:org.vstream.0", Address::Port("org.vstream.0".into())),
        ("fd:0", Address::Fd(0)),
        ("fd:17", Address::Fd(17)),
        ("stdio", Address::Stdio),
    ];
    for (text, expected) in cases {
        assert_eq!(parse(text), expected, "parsing {text:?}");
    }
}

#[test]
fn display_round_trips() {
    let canonical = [
        "unix:/run/vstream.sock",
        "unix-listen:/tmp/a b",
        "tcp:127.0.0.1:5555",
        "tcp:[::1]:5555",
        "tcp:[fe80::1%eth0]:22",
        "tcp-listen:[::]:0",
        "tcp-listen:localhost:80",
        "vsock:2:1024",
        "vsock-listen:4294967295",
        "hvsock:/odd:path/v.sock:52",
        "serial:/dev/ttyS1",
        "serial:/dev/ttyS1,baud=9600",
        "serial:/dev/ttyS1,rtscts",
        "serial:/dev/ttyS1,baud=921600,rtscts",
        "port:org.qemu.guest_agent.0",
        "fd:3",
        "stdio",
    ];
    for text in canonical {
        let address = parse(text);
        assert_eq!(address.to_string(), text, "display of {address:?}");
        assert_eq!(parse(&address.to_string()), address);
    }
    // Non-canonical spellings print canonically and still mean the same thing.
    let serial = parse("serial:/dev/ttyS1,rtscts,baud=115200");
    assert_eq!(serial.to_string(), "serial:/dev/ttyS1,rtscts");
    assert_eq!(parse(&serial.to_string()), serial);
    // Built by hand, with the host unbracketed as the enum keeps it.
    let built = Address::TcpListen {
        host: "::1".into(),
        port: 9,
    };
    assert_eq!(built.to_string(), "tcp-listen:[::1]:9");
    assert_eq!(parse(&built.to_string()), built);
}

#[test]
fn listeners_are_the_listen_forms() {
    let listeners = [
        "unix-listen:/x",
        "tcp-listen:[::]:1",
        "vsock-listen:1",
        "vhost-user-vsock:/x,cid=3,port=1",
    ];
    let others = [
        "unix:/x",
        "tcp:a:1",
        "vsock:2:1",
        "hvsock:/x:1",
        "serial:/dev/ttyS0",
        "port:p",
        "fd:3",
        "stdio",
    ];
    for text in listeners {
        assert!(parse(text).is_listener(), "{text}");
    }
    for text in others {
        assert!(!parse(text).is_listener(), "{text}");
    }
}

#[test]
fn a_vhost_user_vsock_address_round_trips() {
    let text = "vhost-user-vsock:/run/g/vhost.sock,cid=3,port=5000,uds=/run/g/vsock.sock";
    let address = parse(text);
    assert_eq!(
        address,
        Address::VhostUserVsock(VhostVsockConfig {
            socket: "/run/g/vhost.sock".into(),
            cid: 3,
            port: 5000,
            uds: Some("/run/g/vsock.sock".into()),
        })
    );
    assert_eq!(address.to_string(), text);
    let bare = "vhost-user-vsock:/v.sock,cid=7,port=1";
    assert_eq!(parse(bare).to_string(), bare);
}

#[test]
fn bad_inputs_name_the_input_and_the_syntax() {
    // (input, a piece of the problem, a piece of the expected syntax)
    let cases = [
        ("unix:", "path is empty", "unix:PATH"),
        ("unix-listen:", "path is empty", "unix-listen:PATH"),
        ("tcp:localhost", "missing ':PORT'", "tcp:HOST:PORT"),
        ("tcp::80", "host is empty", "tcp:HOST:PORT"),
        ("tcp:host:", "PORT is missing", "tcp:HOST:PORT"),
        ("tcp:host:http", "not a decimal number", "tcp:HOST:PORT"),
        ("tcp:host:+80", "not a decimal number", "tcp:HOST:PORT"),
        ("tcp:host:65536", "out of range", "tcp:HOST:PORT"),
        ("tcp:::1:80", "too many ':'", "[IPv6]"),
        ("tcp:[::1:80", "without a closing ']'", "tcp:HOST:PORT"),
        ("tcp:[::1]80", "missing ':PORT'", "tcp:HOST:PORT"),
        ("tcp:[host]:80", "not an IPv6 address", "tcp:HOST:PORT"),
        (
            "tcp-listen:0.0.0.0",
            "missing ':PORT'",
            "tcp-listen:HOST:PORT",
        ),
        ("vsock:3", "missing ':'", "vsock:CID:PORT"),
        ("vsock:-1:5", "not a decimal number", "vsock:CID:PORT"),
        ("vsock:3:4294967296", "out of range", "vsock:CID:PORT"),
        ("vsock-listen:", "PORT is missing", "vsock-listen:PORT"),
        (
            "vsock-listen:x",
            "not a decimal number",
            "vsock-listen:PORT",
        ),
        ("hvsock:/run/v.sock", "missing ':PORT'", "hvsock:PATH:PORT"),
        ("hvsock:/run/v.sock:", "PORT is missing", "hvsock:PATH:PORT"),
        ("hvsock::52", "path is empty", "hvsock:PATH:PORT"),
        ("hvsock:52", "missing ':PORT'", "hvsock:PATH:PORT"),
        (
            "vhost-user-vsock:,cid=3,port=1",
            "socket path is empty",
            "cid=N",
        ),
        (
            "vhost-user-vsock:/v,port=1",
            "cid=N is missing",
            "SOCKET,cid=N",
        ),
        ("vhost-user-vsock:/v,cid=3", "port=N is missing", "port=N"),
        (
            "vhost-user-vsock:/v,cid=2,port=1",
            "not a guest CID",
            "CID 3",
        ),
        (
            "vhost-user-vsock:/v,cid=3,cid=4,port=1",
            "cid given twice",
            "cid=N",
        ),
        (
            "vhost-user-vsock:/v,cid=3,port=1,x=1",
            "unknown option",
            "uds=PATH",
        ),
        ("serial:", "device is empty", "serial:DEVICE"),
        ("serial:,baud=9600", "device is empty", "serial:DEVICE"),
        (
            "serial:/dev/ttyS0,baud=fast",
            "not a decimal number",
            "serial:DEVICE",
        ),
        ("serial:/dev/ttyS0,baud=0", "more than 0", "serial:DEVICE"),
        (
            "serial:/dev/ttyS0,baud=1,baud=2",
            "baud given twice",
            "serial:DEVICE",
        ),
        (
            "serial:/dev/ttyS0,rtscts,rtscts",
            "rtscts given twice",
            "serial:DEVICE",
        ),
        (
            "serial:/dev/ttyS0,parity=even",
            "unknown serial option",
            "[,baud=N][,rtscts]",
        ),
        (
            "serial:/dev/ttyS0,",
            "unknown serial option \"\"",
            "serial:DEVICE",
        ),
        ("port:", "name is empty", "port:NAME"),
        ("port:../../etc/passwd", "not a port name", "port:NAME"),
        ("port:..", "not a port name", "port:NAME"),
        ("fd:", "N is missing", "fd:N"),
        ("fd:-1", "not a decimal number", "fd:N"),
        ("fd:99999999999", "out of range", "fd:N"),
    ];
    for (input, problem, expected) in cases {
        let error = parse_err(input);
        let message = error.to_string();
        assert!(
            matches!(error, AddressError::Invalid { .. }),
            "{input:?} gave {error:?}"
        );
        assert!(message.contains(&format!("{input:?}")), "{message}");
        assert!(message.contains(problem), "{input:?}: {message}");
        assert!(message.contains(expected), "{input:?}: {message}");
    }
}

#[test]
fn unknown_and_empty_inputs_list_every_form() {
    assert_eq!(parse_err(""), AddressError::Empty);
    assert!(parse_err("").to_string().contains(SYNTAX));
    for (input, kind) in [
        ("udp:1.2.3.4:5", "udp"),
        ("/dev/ttyS0", "/dev/ttyS0"),
        ("Unix:/x", "Unix"),
        ("stdio:", "stdio"),
    ] {
        let error = parse_err(input);
        assert_eq!(
            error,
            AddressError::UnknownKind {
                input: input.into(),
                kind: kind.into()
            }
        );
        let message = error.to_string();
        assert!(message.contains(&format!("{input:?}")), "{message}");
        assert!(message.contains(SYNTAX), "{message}");
    }
}
