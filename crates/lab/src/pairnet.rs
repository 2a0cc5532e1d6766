//! A pair's network in namespaces, for the demo, the benchmarks and the
//! tests: nothing touches the host's own
//! interfaces, and everything is removed on drop.
//!
//! ```text
//!  client ns            bridge ns              primary ns              secondary ns
//!  cli0 10.N.0.1 ─── br0 ─┬─ to primary ──── up0 ─ br0 ─ tap0 (guest)
//!                         └─ to secondary ─────────────────────── up0 ─ br0 ─ tap0 (guest)
//!                                                log0 10.N.1.1 ─────────── log0 10.N.1.2
//! ```
//!
//! The bridges also carry 10.N.0.250 (bridge namespace), .251 (primary) and
//! .252 (secondary), so a test can put an arbiter where both sides reach it.
//!
//! The guest is 10.N.0.2 behind whichever tap is live; the log channel has
//! a veth of its own, so it can be cut or slowed without touching the
//! guest's network.

use crate::netns::sh;
use anyhow::Result;
use std::process::Command;

pub struct PairNet {
    pub client: String,
    pub bridge: String,
    pub primary: String,
    pub secondary: String,
    /// The N of 10.N.0.0/24.
    pub net: u8,
}

impl PairNet {
    /// Build it; `tag` keeps concurrent users apart, `net` picks the subnet.
    pub fn new(tag: &str, net: u8) -> Result<PairNet> {
        let n = PairNet {
            client: format!("ls{tag}-c"),
            bridge: format!("ls{tag}-b"),
            primary: format!("ls{tag}-p"),
            secondary: format!("ls{tag}-s"),
            net,
        };
        // Leftovers of a killed earlier run with the same tag.
        n.remove();
        let (c, b, p, s) = (&n.client, &n.bridge, &n.primary, &n.secondary);
        let mut script = vec![format!("ip netns add {c} && ip netns add {b} && ip netns add {p} && ip netns add {s}")];
        for ns in [c, b, p, s] {
            script.push(format!("ip -n {ns} link set lo up"));
        }
        script.push(format!("ip -n {b} link add br0 type bridge && ip -n {b} link set br0 up"));
        script.push(format!(
            "ip -n {b} link add tocli type veth peer name cli0 netns {c} && ip -n {b} link set tocli master br0 up && \
             ip -n {c} addr add 10.{net}.0.1/24 dev cli0 && ip -n {c} link set cli0 up"
        ));
        for (side, ns) in [("p", p), ("s", s)] {
            script.push(format!(
                "ip -n {b} link add to{side} type veth peer name up0 netns {ns} && ip -n {b} link set to{side} master br0 up && \
                 ip -n {ns} link add br0 type bridge && ip -n {ns} link set br0 up && \
                 ip -n {ns} link set up0 master br0 up && \
                 ip -n {ns} tuntap add dev tap0 mode tap && ip -n {ns} link set tap0 master br0 up"
            ));
        }
        // Addresses for the hosts themselves on the guest network, so an
        // arbiter in the bridge namespace is reachable from both sides
        // whatever happens to the log link.
        script.push(format!(
            "ip -n {b} addr add 10.{net}.0.250/24 dev br0 && ip -n {p} addr add 10.{net}.0.251/24 dev br0 && \
             ip -n {s} addr add 10.{net}.0.252/24 dev br0"
        ));
        script.push(format!(
            "ip -n {p} link add log0 type veth peer name log0 netns {s} && \
             ip -n {p} addr add 10.{net}.1.1/24 dev log0 && ip -n {p} link set log0 up && \
             ip -n {s} addr add 10.{net}.1.2/24 dev log0 && ip -n {s} link set log0 up"
        ));
        for cmd in script {
            if let Err(e) = sh(&cmd) {
                n.remove();
                return Err(e);
            }
        }
        Ok(n)
    }

    /// An address in the bridge namespace both sides reach over the guest
    /// network (for an arbiter such as etcd).
    pub fn arbiter_ip(&self) -> String {
        format!("10.{}.0.250", self.net)
    }

    pub fn guest_ip(&self) -> String {
        format!("10.{}.0.2", self.net)
    }

    /// The secondary's log-channel address, for `--listen` and `--peer`.
    pub fn log_addr(&self, port: u16) -> String {
        format!("10.{}.1.2:{port}", self.net)
    }

    /// The primary's log-channel address (where a side started in the
    /// primary's namespace listens, and a secondary's `--peer`).
    pub fn primary_log_addr(&self, port: u16) -> String {
        format!("10.{}.1.1:{port}", self.net)
    }

    /// Cut the log link (both ways) or heal it.
    pub fn set_log_link(&self, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        sh(&format!("ip -n {} link set log0 {state}", self.primary)).map(drop)
    }

    /// Take a side's uplink to the guest network down (its `up0`: the
    /// carrier goes on both ends) or bring it back; `ns` is `self.primary`
    /// or `self.secondary`.
    pub fn set_uplink(&self, ns: &str, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        sh(&format!("ip -n {ns} link set up0 {state}")).map(drop)
    }

    /// Make the guest network deliver the guest's frames to both sides, as
    /// a hub or a port mirror would (`on`), or send them only where the
    /// guest was last heard, as a learning switch does (off, the default).
    /// Mirroring, the bridges stop learning where the guest's address
    /// lives on the ports towards the sides (and forget what they
    /// learned), so they flood frames for it to both: the secondary then
    /// holds a copy of every packet a client sends the primary (see
    /// lockstep's input mirror).
    pub fn mirror_guest_frames(&self, on: bool) -> Result<()> {
        let how = if on { "learning off fdb_flush" } else { "learning on" };
        let b = &self.bridge;
        sh(&format!(
            "ip -n {b} link set dev top type bridge_slave {how} && ip -n {b} link set dev tos type bridge_slave {how}"
        ))?;
        for ns in [&self.primary, &self.secondary] {
            sh(&format!("ip -n {ns} link set dev up0 type bridge_slave {how}"))?;
        }
        Ok(())
    }

    /// Drop everything the primary sends on the log link (a one-way cut:
    /// the secondary's acks still arrive).
    pub fn cut_log_one_way(&self) -> Result<()> {
        sh(&format!(
            "ip netns exec {} nft 'add table inet oneway; add chain inet oneway out {{ type filter hook output priority 0; }}; \
             add rule inet oneway out oifname \"log0\" drop'",
            self.primary
        ))
        .map(drop)
    }

    /// A slow, lossy log link: both ends capped at `rate_kbit` (a token
    /// bucket, whose queue adds delay under load) and dropping `loss_pct`
    /// of their outgoing packets at random (nftables `numgen`). netem would
    /// be the usual tool, but kernels without `sch_netem` (this project's
    /// CI kernel among them) are common; these two are built in more often.
    pub fn impair_log(&self, rate_kbit: u32, loss_pct: f32) -> Result<()> {
        let per_mille = (loss_pct * 10.0).round() as u32;
        for ns in [&self.primary, &self.secondary] {
            sh(&format!("tc -n {ns} qdisc replace dev log0 root tbf rate {rate_kbit}kbit burst 32kbit latency 200ms"))?;
            sh(&format!(
                "ip netns exec {ns} nft 'add table inet lossy; add chain inet lossy out {{ type filter hook output priority 0; }}; \
                 add rule inet lossy out oifname \"log0\" numgen random mod 1000 < {per_mille} drop'"
            ))?;
        }
        Ok(())
    }

    /// A slow log link without loss: both ends capped at `rate_kbit`,
    /// with a queue of `queue_ms` (a link whose buffer absorbs bursts
    /// rather than dropping them).
    pub fn slow_log(&self, rate_kbit: u32, queue_ms: u32) -> Result<()> {
        for ns in [&self.primary, &self.secondary] {
            sh(&format!(
                "tc -n {ns} qdisc replace dev log0 root tbf rate {rate_kbit}kbit burst 32kbit latency {queue_ms}ms"
            ))?;
        }
        Ok(())
    }

    /// Undo [`PairNet::slow_log`] (and the rate cap of [`PairNet::impair_log`]).
    pub fn heal_log(&self) -> Result<()> {
        for ns in [&self.primary, &self.secondary] {
            sh(&format!("tc -n {ns} qdisc del dev log0 root"))?;
        }
        Ok(())
    }

    fn remove(&self) {
        for ns in [&self.client, &self.bridge, &self.primary, &self.secondary] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(std::process::Stdio::null()).status();
        }
    }
}

impl Drop for PairNet {
    fn drop(&mut self) {
        self.remove();
    }
}
