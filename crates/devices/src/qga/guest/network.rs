//! Network interfaces.

use super::*;

// ---------------------------------------------------------------------------------------------
// Network interfaces.

pub(super) fn prefix_len(mask: &[u8]) -> i64 {
    mask.iter().map(|b| i64::from(b.count_ones())).sum()
}

/// /proc/net/dev counters by interface.
pub(crate) fn parse_net_dev(text: &str) -> HashMap<String, GuestNetworkInterfaceStat> {
    let mut out = HashMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let v: Vec<u64> = rest
            .split_ascii_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        if v.len() < 12 {
            continue;
        }
        out.insert(
            name.trim().to_owned(),
            GuestNetworkInterfaceStat {
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errs: v[2],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errs: v[10],
                tx_dropped: v[11],
            },
        );
    }
    out
}

pub(super) fn interfaces() -> Result<Vec<GuestNetworkInterface>, QgaError> {
    let list = nix::ifaddrs::getifaddrs()
        .map_err(|e| QgaError::io("getifaddrs failed", &io::Error::from(e)))?;
    let stats = read_text(Path::new("/proc/net/dev"), 1024 * 1024)
        .map(|t| parse_net_dev(&t))
        .unwrap_or_default();
    let mut out: Vec<GuestNetworkInterface> = Vec::new();
    for ifa in list {
        let name = ifa.interface_name;
        let idx = match out.iter().position(|i| i.name == name) {
            Some(i) => i,
            None => {
                out.push(GuestNetworkInterface {
                    statistics: stats.get(&name).cloned(),
                    name,
                    hardware_address: None,
                    ip_addresses: None,
                });
                out.len() - 1
            }
        };
        let iface = &mut out[idx];
        let Some(addr) = ifa.address else {
            continue;
        };
        let netmask = ifa.netmask;
        let ip = if let Some(ll) = addr.as_link_addr() {
            let n = ll.halen().min(6);
            if let Some(mac) = ll.addr().filter(|_| n > 0) {
                iface.hardware_address = Some(
                    mac[..n]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                );
            }
            None
        } else if let Some(sin) = addr.as_sockaddr_in() {
            let prefix = netmask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in())
                .map_or(32, |m| prefix_len(&m.ip().octets()));
            Some(GuestIpAddress {
                ip_address: sin.ip().to_string(),
                ip_address_type: "ipv4".into(),
                prefix,
            })
        } else if let Some(sin6) = addr.as_sockaddr_in6() {
            let prefix = netmask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in6())
                .map_or(128, |m| prefix_len(&m.ip().octets()));
            Some(GuestIpAddress {
                ip_address: sin6.ip().to_string(),
                ip_address_type: "ipv6".into(),
                prefix,
            })
        } else {
            None
        };
        if let Some(a) = ip {
            iface.ip_addresses.get_or_insert_with(Vec::new).push(a);
        }
    }
    Ok(out)
}
