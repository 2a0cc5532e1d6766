//! `lab`: what only tests, benchmarks and the demo use, one implementation
//! of each.
//!
//! | module | what lives there |
//! |---|---|
//! | [`netns`] | shell commands, running code or a program inside a network namespace, a one-guest network ([`netns::GuestNet`]) |
//! | [`pairnet`] | a pair's network: client, bridge, primary and secondary namespaces and a log link ([`pairnet::PairNet`]) |
//! | [`pair`] | a pair of the default guest in a `PairNet`, and the numbered-write client thread |
//! | [`nemesis`] | random faults against such a pair, each followed by re-protection and the invariants |
//! | [`workload`] | redis over TCP and the numbered-write workload |
//! | [`capture`] | a child process with its output captured as it arrives |
//! | [`stats`] | medians and numbers read from tools' output |
//!
//! Nothing here touches the host's own interfaces: every topology lives in
//! namespaces it creates and removes on drop.

pub mod capture;
pub mod nemesis;
pub mod netns;
pub mod pair;
pub mod pairnet;
pub mod stats;
pub mod workload;
