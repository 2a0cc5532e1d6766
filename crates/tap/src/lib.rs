//! A Linux tap device: the host end of a guest's network card.
//!
//! [`Tap::open`] attaches to the tap interface `NAME`, creating it if it
//! does not exist (a created tap disappears when the last descriptor
//! closes), and brings its link up. Each `recv` returns one frame, each
//! `send` sends one, with a 12-byte virtio-net header in front
//! (IFF_VNET_HDR): with offloads on, frames may be checksum-pending or TSO
//! (up to 64 KiB) and the header says so; with offloads off the kernel
//! finishes every frame before handing it over.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name '{0}' is not a valid interface name (1 to 15 bytes, no '/', ':' or whitespace)")]
    BadName(String),
    #[error("cannot open /dev/net/tun for tap '{name}'")]
    Open { name: String, source: std::io::Error },
    #[error("cannot attach tap '{name}'{hint}")]
    Attach { name: String, source: std::io::Error, hint: &'static str },
    #[error("cannot bring tap '{name}' up")]
    Up { name: String, source: std::io::Error },
}

/// Bytes of virtio-net header in front of every frame.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame `recv` returns, header included (a 64 KiB TSO frame).
pub const MAX_PACKET: usize = VNET_HDR_LEN + 65_550;
const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;

/// What [`Tap::recv_until`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A frame of this many bytes.
    Frame(usize),
    Woken,
    TimedOut,
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers
    // and addresses); all zeroes is a valid value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// A socket for interface ioctls, and `name`'s flags read into an ifreq.
fn flags_request(name: &str) -> std::io::Result<(OwnedFd, libc::ifreq)> {
    // SAFETY: socket() has no memory arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq_for(name);
    // SAFETY: SIOCGIFFLAGS fills the flags of the ifreq it is given.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req as *mut libc::ifreq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((sock, req))
}

/// Whether a network interface can carry frames, as its flags say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Up,
    /// Set down by an administrator (`ip link set ... down`).
    AdminDown,
    /// Up, but with no carrier (a cable pulled, a veth peer down, a tap
    /// nobody holds).
    NoCarrier,
    /// No interface of that name (in this network namespace).
    Missing,
}

/// The state of interface `name` (any interface, not only a tap).
pub fn link_state(name: &str) -> std::io::Result<LinkState> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Ok(LinkState::Missing);
    }
    let req = match flags_request(name) {
        Ok((_, req)) => req,
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(LinkState::Missing),
        Err(e) => return Err(e),
    };
    // SAFETY: SIOCGIFFLAGS (in `flags_request`) set the flags member.
    let flags = unsafe { req.ifr_ifru.ifru_flags } as libc::c_int & 0xffff;
    Ok(if flags & libc::IFF_UP == 0 {
        LinkState::AdminDown
    } else if flags & libc::IFF_RUNNING == 0 {
        LinkState::NoCarrier
    } else {
        LinkState::Up
    })
}

impl Tap {
    /// Attach to (or create) tap `name` and bring it up.
    pub fn open(name: &str, offloads: bool) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() > 15 || name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
        {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|source| TapError::Open { name: name.to_string(), source })?;
        let mut req = ifreq_for(name);
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is and
        // which outlives the call; the descriptor is open.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut libc::ifreq) };
        if rc < 0 {
            let source = std::io::Error::last_os_error();
            let hint = match source.raw_os_error() {
                Some(libc::EPERM) => " (creating or attaching a tap needs root or CAP_NET_ADMIN)",
                Some(libc::EBUSY) => " (another process holds it)",
                Some(libc::EINVAL) => " (is an interface of another kind named so?)",
                _ => "",
            };
            return Err(TapError::Attach { name: name.to_string(), source, hint });
        }
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at `hdr_len` for the duration of the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) } < 0 {
            let source = std::io::Error::last_os_error();
            return Err(TapError::Attach { name: name.to_string(), source, hint: " (setting the vnet header size)" });
        }
        // Always set, also to none: a persistent tap keeps the offloads a
        // previous user (QEMU) turned on.
        let flags = if offloads { TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 } else { 0 };
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // passed.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            let source = std::io::Error::last_os_error();
            return Err(TapError::Attach { name: name.to_string(), source, hint: " (setting offloads)" });
        }
        let tap = Tap { file, name: name.to_string() };
        tap.set_up().map_err(|source| TapError::Up { name: name.to_string(), source })?;
        Ok(tap)
    }

    /// Set IFF_UP on the interface (a new tap starts down).
    fn set_up(&self) -> std::io::Result<()> {
        let (sock, mut req) = flags_request(&self.name)?;
        // SAFETY: SIOCGIFFLAGS (in `flags_request`) set the flags member.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        if flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads the ifreq it is given.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req as *mut libc::ifreq) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A second handle on the same queue, e.g. for a reader thread.
    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap { file: self.file.try_clone()?, name: self.name.clone() })
    }

    /// Block until a frame arrives; returns its length.
    pub fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Wait for a frame (read into `buf`), for `wake` to become readable
    /// (the queue untouched: a reader another thread can stop without
    /// losing a frame to it), or for `timeout` (`None`: no limit).
    pub fn recv_until(
        &mut self,
        buf: &mut [u8],
        wake: BorrowedFd<'_>,
        timeout: Option<std::time::Duration>,
    ) -> std::io::Result<Received> {
        let mut fds = [
            libc::pollfd { fd: self.file.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
        loop {
            // SAFETY: poll reads and writes exactly the two pollfds of
            // `fds`, which lives across the call; both descriptors are
            // open (one owned by self, one borrowed for the call).
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc == 0 {
                return Ok(Received::TimedOut);
            }
            if fds[1].revents != 0 {
                return Ok(Received::Woken);
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return self.file.read(buf).map(Received::Frame);
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the tap went away"));
            }
        }
    }

    /// Drop the frames queued for reading now (what arrived while nobody
    /// read the tap); returns how many.
    pub fn discard_queued(&mut self) -> std::io::Result<usize> {
        let mut buf = vec![0u8; MAX_PACKET];
        let mut n = 0;
        loop {
            let mut pfd = libc::pollfd { fd: self.file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: poll reads and writes exactly one pollfd, `pfd`, which
            // lives across the call; a zero timeout never blocks.
            let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if rc == 0 || pfd.revents & libc::POLLIN == 0 {
                return Ok(n);
            }
            // One read takes one whole frame, whatever its length.
            let _frame_len = self.file.read(&mut buf)?;
            n += 1;
        }
    }

    /// Send one frame.
    pub fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "short write to tap"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_up_and_a_missing_interface_says_so() {
        assert_eq!(link_state("lo").unwrap(), LinkState::Up);
        assert_eq!(link_state("no-such-if0").unwrap(), LinkState::Missing);
        assert_eq!(link_state("").unwrap(), LinkState::Missing);
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for n in ["", "a/b", "x:y", "with space", "sixteen-bytes-xx"] {
            assert!(matches!(Tap::open(n, false), Err(TapError::BadName(_))), "{n}");
        }
    }

    #[test]
    fn messages_leave_the_os_error_to_the_source() {
        let source = std::io::Error::from_raw_os_error(libc::EPERM);
        let hint = " (creating or attaching a tap needs root or CAP_NET_ADMIN)";
        let e = TapError::Attach { name: "tap0".into(), source, hint };
        assert_eq!(e.to_string(), "cannot attach tap 'tap0' (creating or attaching a tap needs root or CAP_NET_ADMIN)");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn a_tap_is_created_up_and_carries_frames() {
        // Needs root and /dev/net/tun; the CI machine has both.
        let name = format!("lstt{}", std::process::id() % 100_000);
        let tap = match Tap::open(&name, true) {
            Ok(t) => t,
            Err(e) => panic!("{e}: {:?}", std::error::Error::source(&e)),
        };
        let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_ne!(flags & libc::IFF_UP as u32, 0, "link is up");
        let mut t = tap.try_clone().unwrap();
        // A frame written with no peer listening is accepted (and dropped
        // by the host stack, since it is addressed to nobody).
        let mut frame = vec![0u8; VNET_HDR_LEN + 60];
        let eth = &mut frame[VNET_HDR_LEN..];
        eth[0..6].copy_from_slice(&[0x52, 0x54, 0, 9, 9, 9]);
        eth[6..12].copy_from_slice(&[0x52, 0x54, 0, 1, 1, 1]);
        eth[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype
        t.send(&frame).unwrap();
        drop(t);
        drop(tap);
        assert!(!std::path::Path::new(&format!("/sys/class/net/{name}")).exists(), "a created tap goes when closed");
    }
}
