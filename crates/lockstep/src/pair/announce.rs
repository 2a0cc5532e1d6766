//! Telling the network where the guest is now: after a secondary goes
//! live, frames that make the bridge and the clients' neighbour caches
//! learn the guest's new port; and the guest's own addresses, learned from
//! the frames it sent while the secondary replayed.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const VNET_HDR: usize = tap::VNET_HDR_LEN;

/// The guest's own IP address in a frame it sent, if it has one.
pub fn source_address(frame: &[u8], mac: &[u8; 6]) -> Option<IpAddr> {
    let eth = frame.get(VNET_HDR..)?;
    if eth.get(6..12)? != mac {
        return None;
    }
    let ethertype = u16::from_be_bytes([*eth.get(12)?, *eth.get(13)?]);
    let payload = &eth[14..];
    let ip = match ethertype {
        0x0806 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(payload.get(14..18)?).ok()?)),
        0x0800 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(payload.get(12..16)?).ok()?)),
        0x86dd => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(payload.get(8..24)?).ok()?)),
        _ => return None,
    };
    (!ip.is_unspecified()).then_some(ip)
}

fn ethernet(dst: [u8; 6], src: &[u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR];
    f.extend_from_slice(&dst);
    f.extend_from_slice(src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A RARP request for `mac` (what QEMU and ESXi send: it needs no IP).
pub fn rarp(mac: &[u8; 6]) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4, 0, 3];
    p.extend_from_slice(mac);
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(mac);
    p.extend_from_slice(&[0; 4]);
    ethernet([0xff; 6], mac, 0x8035, &p)
}

/// A gratuitous ARP request: sender and target are the guest's address.
pub fn garp(mac: &[u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
    p.extend_from_slice(mac);
    p.extend_from_slice(&ip.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&ip.octets());
    ethernet([0xff; 6], mac, 0x0806, &p)
}

/// An unsolicited neighbour advertisement (override set) to all nodes.
pub fn unsolicited_na(mac: &[u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(mac);
    // Checksum over the pseudo-header and the message.
    let mut sum = 0u32;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
        }
    };
    add(&ip.octets());
    add(&dst.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(&icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut ip6 = vec![0x60, 0, 0, 0];
    ip6.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    ip6.extend_from_slice(&[58, 255]);
    ip6.extend_from_slice(&ip.octets());
    ip6.extend_from_slice(&dst.octets());
    ip6.extend_from_slice(&icmp);
    ethernet([0x33, 0x33, 0, 0, 0, 1], mac, 0x86dd, &ip6)
}

/// The frames of one announcement round.
pub fn frames(mac: &[u8; 6], addresses: &[IpAddr]) -> Vec<Vec<u8>> {
    let mut out = vec![rarp(mac)];
    for a in addresses {
        out.push(match a {
            IpAddr::V4(v4) => garp(mac, *v4),
            IpAddr::V6(v6) => unsolicited_na(mac, *v6),
        });
    }
    out
}

/// Announce at once, then again after 50, 150, 300 and 500 ms (as
/// QEMU's announce rounds), in case the first frames meet a bridge or
/// neighbour that is not ready.
pub fn spawn(mut tap: tap::Tap, mac: [u8; 6], addresses: Vec<IpAddr>) {
    std::thread::spawn(move || {
        let mut last = 0;
        for at in [0u64, 50, 150, 300, 500] {
            std::thread::sleep(std::time::Duration::from_millis(at - last));
            last = at;
            for f in frames(&mac, &addresses) {
                let _ = tap.send(&f);
            }
        }
    });
}

/// A MAC address as people write it.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

    #[test]
    fn addresses_are_learned_from_the_guests_own_frames() {
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        assert_eq!(source_address(&garp(&MAC, ip), &MAC), Some(IpAddr::V4(ip)));
        let v6: Ipv6Addr = "fe80::5054:ff:fe01:203".parse().unwrap();
        assert_eq!(source_address(&unsolicited_na(&MAC, v6), &MAC), Some(IpAddr::V6(v6)));
        // Someone else's frame, or no address: nothing.
        assert_eq!(source_address(&garp(&[1; 6], ip), &MAC), None);
        assert_eq!(source_address(&rarp(&MAC), &MAC), None);
        assert_eq!(source_address(&[0; 20], &MAC), None);
    }

    #[test]
    fn neighbour_advertisement_checksum_verifies() {
        let v6: Ipv6Addr = "fd00::2".parse().unwrap();
        let f = unsolicited_na(&MAC, v6);
        let ip6 = &f[VNET_HDR + 14..];
        let icmp = &ip6[40..];
        let mut sum = 0u32;
        for b in [&ip6[8..24], &ip6[24..40], &(icmp.len() as u32).to_be_bytes()[..], &[0, 0, 0, 58][..], icmp] {
            for c in b.chunks(2) {
                sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
            }
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff, "a valid checksum sums to all ones");
        assert_eq!(icmp[0], 136);
    }
}
