//! The libvirt hook: what vstreamd must attach when a domain starts, read from the domain XML
//! that libvirtd hands its hooks on stdin (docs/INSTALL.md, "libvirt").
//!
//! A hook may not call back into libvirt (libvirtd waits for it), so everything comes from that
//! XML. The guest is the domain: its name is the domain's name, and a connection is that guest
//! because it comes through the socket libvirt made for that domain; whatever name the agent
//! announces is not asked.

use crate::control::{AttachTransport, Request};

/// The virtio-serial port vstream-agent opens (`<target type='virtio' name='...'/>`).
pub const CHANNEL: &str = "org.vstream.0";

/// The largest domain XML read from stdin (libvirt's own limit for a domain XML is 10 MiB).
pub const MAX_XML: u64 = 10 * 1024 * 1024;

/// What the hook does for one libvirt operation (`/etc/libvirt/hooks/qemu DOMAIN OP ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `started`, `reconnect` (libvirtd restarted while the domain runs): attach.
    Attach,
    /// `stopped`: let go.
    Detach,
    /// Any other operation (`prepare`, `start`, `release` after `stopped`, `migrate`, ...):
    /// nothing.
    Nothing,
}

impl Action {
    /// The action for libvirt's operation `op`.
    pub fn of(op: &str) -> Action {
        match op {
            "started" | "reconnect" => Action::Attach,
            "stopped" => Action::Detach,
            _ => Action::Nothing,
        }
    }
}

/// A domain as the hook reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`.
    pub uuid: Option<String>,
    /// The `org.vstream.0` channel (a mux transport) and the consoles.
    pub transports: Vec<AttachTransport>,
    /// Devices the hook cannot attach, and why (for the hook's stderr, which libvirtd logs).
    pub skipped: Vec<String>,
}

impl Domain {
    /// Reads a domain XML (`<domain>`, as libvirt gives it to hooks).
    pub fn parse(xml: &str) -> Result<Domain, String> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
        let root = doc.root_element();
        if !root.has_tag_name("domain") {
            return Err(format!(
                "domain XML: <{}> where <domain> was expected",
                root.tag_name().name()
            ));
        }
        let text = |tag: &str| {
            child(root, tag)
                .and_then(|n| n.text())
                .map(|t| t.trim().to_owned())
        };
        let name = text("name").ok_or("domain XML: no <name>")?;
        let mut domain = Domain {
            name,
            uuid: text("uuid"),
            transports: Vec::new(),
            skipped: Vec::new(),
        };
        let Some(devices) = child(root, "devices") else {
            return Ok(domain);
        };
        for dev in devices.children().filter(roxmltree::Node::is_element) {
            let target = child(dev, "target");
            let (kind, name) = match dev.tag_name().name() {
                "channel" if attr(target, "name") == Some(CHANNEL) => ("mux", CHANNEL.to_owned()),
                "serial" => (
                    CONSOLE_KIND,
                    format!("ttyS{}", attr(target, "port").unwrap_or("0")),
                ),
                // A `<console>` of target type serial (the default) is the first `<serial>`
                // again; a virtio one is hvcN.
                "console" if attr(target, "type") == Some("virtio") => (
                    CONSOLE_KIND,
                    format!("hvc{}", attr(target, "port").unwrap_or("0")),
                ),
                "console" => (
                    CONSOLE_KIND,
                    format!("ttyS{}", attr(target, "port").unwrap_or("0")),
                ),
                _ => continue,
            };
            let source = child(dev, "source");
            let path = attr(source, "path");
            match (dev.attribute("type"), attr(source, "mode"), path) {
                // QEMU listens (libvirt's default mode): vstreamd connects.
                (Some("unix"), None | Some("bind"), Some(path)) => {
                    let address = format!("unix:{path}");
                    if domain.transports.iter().any(|t| t.address == address) {
                        continue;
                    }
                    domain.transports.push(AttachTransport {
                        kind: kind.to_owned(),
                        address,
                        name: Some(name),
                    });
                }
                // A `<console>` repeating a skipped `<serial>` is said once.
                _ if domain
                    .skipped
                    .iter()
                    .any(|s| s.starts_with(&format!("{name}:"))) => {}
                (t, mode, _) => domain.skipped.push(format!(
                    "{name}: type {:?}, mode {:?}: vstreamd reaches a domain's ports through \
                     Unix sockets that QEMU listens on (type='unix', mode='bind')",
                    t.unwrap_or("-"),
                    mode.unwrap_or("-"),
                )),
            }
        }
        Ok(domain)
    }

    /// Whether the domain has anything for vstreamd (else the hook leaves it alone).
    pub fn wanted(&self) -> bool {
        !self.transports.is_empty()
    }

    /// The `attach` request for this domain.
    pub fn attach(&self) -> Request {
        Request::Attach {
            guest: self.name.clone(),
            uuid: self.uuid.clone(),
            transports: self.transports.clone(),
        }
    }
}

/// The transport kind of a guest's console (a device's raw kind).
const CONSOLE_KIND: &str = vstream_devices::console::device::CLASS;

fn attr<'a>(node: Option<roxmltree::Node<'a, '_>>, name: &str) -> Option<&'a str> {
    node.and_then(|n| n.attribute(name))
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|n| n.has_tag_name(tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A domain as libvirt 9.0 hands it to a hook at `started` (paths filled in by libvirt).
    const STARTED: &str = r#"<domain type='qemu' id='7'>
  <name>web-1</name>
  <uuid>5f1c3a6e-2b7d-4c8e-9a0b-1c2d3e4f5a6b</uuid>
  <devices>
    <serial type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/web-1/ttyS0.sock'/>
      <target type='isa-serial' port='0'><model name='isa-serial'/></target>
      <alias name='serial0'/>
    </serial>
    <console type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/web-1/ttyS0.sock'/>
      <target type='serial' port='0'/>
    </console>
    <console type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/web-1/hvc1.sock'/>
      <target type='virtio' port='1'/>
    </console>
    <console type='pty' tty='/dev/pts/3'>
      <source path='/dev/pts/3'/>
      <target type='virtio' port='2'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-7-web-1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-7-web-1/org.vstream.0'/>
      <target type='virtio' name='org.vstream.0' state='disconnected'/>
    </channel>
  </devices>
</domain>"#;

    #[test]
    fn a_started_domain_gives_its_channel_and_unix_consoles() {
        let d = Domain::parse(STARTED).expect("parses");
        assert_eq!(d.name, "web-1");
        assert_eq!(
            d.uuid.as_deref(),
            Some("5f1c3a6e-2b7d-4c8e-9a0b-1c2d3e4f5a6b")
        );
        let got: Vec<(&str, &str, &str)> = d
            .transports
            .iter()
            .map(|t| {
                (
                    t.kind.as_str(),
                    t.name.as_deref().unwrap_or(""),
                    t.address.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    CONSOLE_KIND,
                    "ttyS0",
                    "unix:/var/lib/libvirt/qemu/web-1/ttyS0.sock"
                ),
                (
                    CONSOLE_KIND,
                    "hvc1",
                    "unix:/var/lib/libvirt/qemu/web-1/hvc1.sock"
                ),
                (
                    "mux",
                    CHANNEL,
                    "unix:/var/lib/libvirt/qemu/channel/target/domain-7-web-1/org.vstream.0"
                ),
            ]
        );
        // The pty console is named, not attached; qemu-ga's channel is not ours.
        assert_eq!(d.skipped.len(), 1, "{:?}", d.skipped);
        assert!(
            d.skipped[0].starts_with("hvc2: type \"pty\""),
            "{:?}",
            d.skipped
        );
        assert!(d.wanted());
    }

    #[test]
    fn a_domain_without_our_devices_is_left_alone_and_bad_xml_is_an_error() {
        let plain =
            "<domain type='kvm'><name>db</name><devices><disk type='file'/></devices></domain>";
        let d = Domain::parse(plain).expect("parses");
        assert!(!d.wanted() && d.skipped.is_empty());
        // A channel QEMU connects out from would need vstreamd listening before the domain
        // starts: named, not attached.
        let connect = "<domain><name>x</name><devices><channel type='unix'>\
            <source mode='connect' path='/run/x.sock'/><target type='virtio' name='org.vstream.0'/>\
            </channel></devices></domain>";
        let d = Domain::parse(connect).expect("parses");
        assert!(!d.wanted());
        assert!(d.skipped[0].contains("\"connect\""), "{:?}", d.skipped);
        for bad in [
            "",
            "<domain>",
            "<network><name>n</name></network>",
            "<domain/>",
        ] {
            assert!(Domain::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn operations_map_to_actions() {
        assert_eq!(Action::of("started"), Action::Attach);
        assert_eq!(Action::of("reconnect"), Action::Attach);
        assert_eq!(Action::of("stopped"), Action::Detach);
        for op in [
            "prepare", "start", "release", "migrate", "restore", "attach", "",
        ] {
            assert_eq!(Action::of(op), Action::Nothing, "{op}");
        }
    }
}
