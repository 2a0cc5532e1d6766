//! An in-process network peer for tests: a host at one IPv4 address that
//! answers ARP requests and ICMP echo requests, so a guest's network card
//! can be exercised end to end (driver, queues, interrupts) with no tap,
//! no privileges and, given a deterministic run loop, deterministically.

const ETH_ARP: [u8; 2] = [0x08, 0x06];
const ETH_IPV4: [u8; 2] = [0x08, 0x00];

/// The simulated host.
pub struct Responder {
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    /// Echo requests answered.
    pub echoes: u64,
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Responder {
    pub fn new(mac: [u8; 6], ip: [u8; 4]) -> Responder {
        Responder { mac, ip, echoes: 0 }
    }

    /// The reply to a frame the guest sent, if it asks this host something.
    pub fn answer(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
        if frame.len() < 14 {
            return None;
        }
        let (src_mac, ethertype, body) = (&frame[6..12], &frame[12..14], &frame[14..]);
        match ethertype {
            t if t == ETH_ARP => self.arp(src_mac, body),
            t if t == ETH_IPV4 => self.icmp_echo(frame),
            _ => None,
        }
    }

    fn arp(&self, src_mac: &[u8], arp: &[u8]) -> Option<Vec<u8>> {
        // Ethernet/IPv4 request for our address.
        if arp.len() < 28 || arp[0..8] != [0, 1, 8, 0, 6, 4, 0, 1] || arp[24..28] != self.ip {
            return None;
        }
        let mut out = Vec::with_capacity(60);
        out.extend_from_slice(src_mac);
        out.extend_from_slice(&self.mac);
        out.extend_from_slice(&ETH_ARP);
        out.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        out.extend_from_slice(&self.mac);
        out.extend_from_slice(&self.ip);
        out.extend_from_slice(&arp[8..18]); // sender MAC and IP become the target
        out.resize(60, 0);
        Some(out)
    }

    fn icmp_echo(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
        let ip = &frame[14..];
        if ip.len() < 20 || ip[0] >> 4 != 4 {
            return None;
        }
        let ihl = (ip[0] & 15) as usize * 4;
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        if ihl < 20 || total < ihl + 8 || total > ip.len() || ip[9] != 1 || ip[16..20] != self.ip {
            return None;
        }
        if ip[ihl] != 8 {
            return None; // not an echo request
        }
        let mut out = Vec::with_capacity(14 + total);
        out.extend_from_slice(&frame[6..12]);
        out.extend_from_slice(&self.mac);
        out.extend_from_slice(&ETH_IPV4);
        let mut reply = ip[..total].to_vec();
        reply[12..16].copy_from_slice(&ip[16..20]);
        reply[16..20].copy_from_slice(&ip[12..16]);
        reply[8] = 64; // TTL
        reply[10..12].fill(0);
        let sum = checksum(&reply[..ihl]);
        reply[10..12].copy_from_slice(&sum.to_be_bytes());
        reply[ihl] = 0; // echo reply
        reply[ihl + 2..ihl + 4].fill(0);
        let sum = checksum(&reply[ihl..]);
        reply[ihl + 2..ihl + 4].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&reply);
        if out.len() < 60 {
            out.resize(60, 0);
        }
        self.echoes += 1;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
    const HOST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

    fn arp_request(target: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ETH_ARP);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[10, 0, 2, 15]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target);
        f
    }

    #[test]
    fn answers_arp_for_its_address_only() {
        let mut r = Responder::new(HOST_MAC, [10, 0, 2, 2]);
        let reply = r.answer(&arp_request([10, 0, 2, 2])).unwrap();
        assert_eq!(&reply[0..6], &GUEST_MAC);
        assert_eq!(&reply[20..22], &[0, 2], "ARP reply");
        assert_eq!(&reply[22..28], &HOST_MAC);
        assert_eq!(&reply[28..32], &[10, 0, 2, 2]);
        assert_eq!(&reply[38..42], &[10, 0, 2, 15]);
        assert!(r.answer(&arp_request([10, 0, 2, 3])).is_none());
        assert!(r.answer(&[0; 10]).is_none());
    }

    #[test]
    fn answers_echo_with_valid_checksums() {
        let mut r = Responder::new(HOST_MAC, [10, 0, 2, 2]);
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 1, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2];
        let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
        icmp.extend_from_slice(b"payload!");
        let s = checksum(&icmp);
        icmp[2..4].copy_from_slice(&s.to_be_bytes());
        let total = (ip.len() + icmp.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let s = checksum(&ip);
        ip[10..12].copy_from_slice(&s.to_be_bytes());
        let mut f = HOST_MAC.to_vec();
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ETH_IPV4);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&icmp);
        let reply = r.answer(&f).unwrap();
        let rip = &reply[14..34];
        assert_eq!(checksum(rip), 0, "IP header checksum");
        assert_eq!(&rip[12..16], &[10, 0, 2, 2]);
        assert_eq!(&rip[16..20], &[10, 0, 2, 15]);
        let ricmp = &reply[34..34 + icmp.len()];
        assert_eq!(ricmp[0], 0, "echo reply");
        assert_eq!(checksum(ricmp), 0, "ICMP checksum");
        assert_eq!(&ricmp[8..], b"payload!");
        assert_eq!(r.echoes, 1);
    }
}
