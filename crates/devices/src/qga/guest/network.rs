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

/// Frees the getifaddrs list when dropped.
pub(super) struct IfAddrs(*mut libc::ifaddrs);

impl Drop for IfAddrs {
    fn drop(&mut self) {
        // SAFETY: the pointer came from a successful getifaddrs and is freed once.
        unsafe { libc::freeifaddrs(self.0) }
    }
}

pub(super) fn interfaces() -> Result<Vec<GuestNetworkInterface>, QgaError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs stores a list head in `head`; it is freed by IfAddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(QgaError::io(
            "getifaddrs failed",
            &io::Error::last_os_error(),
        ));
    }
    let list = IfAddrs(head);
    let stats = read_text(Path::new("/proc/net/dev"), 1024 * 1024)
        .map(|t| parse_net_dev(&t))
        .unwrap_or_default();
    let mut out: Vec<GuestNetworkInterface> = Vec::new();
    let mut cur = list.0;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list, valid until `list` is dropped below.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
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
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr at least as large as its family's type, as
        // getifaddrs guarantees for AF_PACKET, AF_INET and AF_INET6; netmask likewise.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let addr = match family {
            libc::AF_PACKET => {
                // SAFETY: see above: an AF_PACKET address is a sockaddr_ll.
                let ll = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_ll) };
                let n = usize::from(ll.sll_halen).min(ll.sll_addr.len());
                if n > 0 {
                    iface.hardware_address = Some(
                        ll.sll_addr[..n]
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":"),
                    );
                }
                None
            }
            libc::AF_INET => {
                // SAFETY: see above: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let prefix = if ifa.ifa_netmask.is_null() {
                    32
                } else {
                    // SAFETY: the netmask has the address's family.
                    let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
                    prefix_len(&m.sin_addr.s_addr.to_ne_bytes())
                };
                Some(GuestIpAddress {
                    ip_address: ip.to_string(),
                    ip_address_type: "ipv4".into(),
                    prefix,
                })
            }
            libc::AF_INET6 => {
                // SAFETY: see above: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                let prefix = if ifa.ifa_netmask.is_null() {
                    128
                } else {
                    // SAFETY: the netmask has the address's family.
                    let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in6) };
                    prefix_len(&m.sin6_addr.s6_addr)
                };
                Some(GuestIpAddress {
                    ip_address: ip.to_string(),
                    ip_address_type: "ipv6".into(),
                    prefix,
                })
            }
            _ => None,
        };
        if let Some(a) = addr {
            iface.ip_addresses.get_or_insert_with(Vec::new).push(a);
        }
    }
    Ok(out)
}
