//! The status endpoint of a pair side: `GET /metrics` (Prometheus text),
//! `GET /status` (JSON, what `lockstep status` reads), and actions a
//! primary is asked for by `POST` (`/switchover`, `/migrate?to=ADDR`).

use anyhow::{Context, Result};
use ft::Status;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

pub type StatusFn = Box<dyn Fn() -> Status + Send + Sync>;
/// The actions `POST PATH?QUERY` asks for: `None` for an unknown path,
/// else `Ok` with what was done or `Err` with why not (answered 409).
pub type ActionFn = Box<dyn Fn(&str, &str) -> Option<Result<String, String>> + Send + Sync>;

/// How long one request may take to arrive, whole.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// The longest request head read (a request line and a few headers).
const MAX_HEAD: u64 = 8 << 10;

/// Serve the side's figures on `addr`: each connection on a thread of its
/// own, with a deadline for the whole request and a bound on its size, so
/// a client that trickles bytes or sends an endless line holds up nobody.
pub fn serve(addr: &str, status: StatusFn, actions: ActionFn) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot serve metrics on {addr}"))?;
    let both = std::sync::Arc::new((status, actions));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let both = both.clone();
            std::thread::spawn(move || answer(stream, &both.0, &both.1));
        }
    });
    Ok(())
}

fn answer(mut stream: TcpStream, status: &StatusFn, actions: &ActionFn) -> std::io::Result<()> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut head = Vec::new();
    let mut reader = stream.try_clone()?.take(MAX_HEAD);
    let mut buf = [0u8; 512];
    // Read until the blank line that ends the head (closing with unread
    // bytes would reset the connection under the client's feet).
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        stream.set_read_timeout(Some(left))?;
        match reader.read(&mut buf)? {
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut line = text.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let action = if method == "POST" { actions(path, query) } else { None };
    let (code, kind, body) = match (path, action) {
        ("/metrics", _) => ("200 OK", "text/plain; version=0.0.4", status().prometheus()),
        ("/status", _) => ("200 OK", "application/json", serde_json::to_string(&status()).unwrap_or_default()),
        (_, Some(Ok(done))) => ("202 Accepted", "text/plain", format!("{done}\n")),
        (_, Some(Err(why))) => ("409 Conflict", "text/plain", format!("{why}\n")),
        _ => (
            "404 Not Found",
            "text/plain",
            "try GET /metrics, GET /status, POST /switchover or POST /migrate?to=HOST:PORT\n".to_string(),
        ),
    };
    stream.set_write_timeout(Some(REQUEST_DEADLINE))?;
    write!(
        stream,
        "HTTP/1.0 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Fetch a side's status from its endpoint.
pub fn fetch(addr: &str) -> Result<Status> {
    let sock = addr.parse().with_context(|| format!("'{addr}' is not HOST:PORT"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(2))
        .with_context(|| format!("no lockstep side answers on {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text).with_context(|| format!("reading the status from {addr}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).with_context(|| format!("{addr} did not answer with a lockstep status"))
}

/// Ask a side for an action (`POST PATH`): its answer's text, or an
/// error with the text of a refusal.
pub fn post(addr: &str, path: &str) -> Result<String> {
    let sock = addr.parse().with_context(|| format!("'{addr}' is not HOST:PORT"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(2))
        .with_context(|| format!("no lockstep side answers on {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text).with_context(|| format!("reading the answer from {addr}"))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let ok = head.split_whitespace().nth(1).is_some_and(|code| code.starts_with('2'));
    if ok {
        Ok(body.trim().to_string())
    } else {
        anyhow::bail!("{addr}: {}", body.trim())
    }
}

/// The human form of `lockstep status`.
pub fn describe(addr: &str, s: &Status) -> String {
    let state = s.state.map_or("unknown".to_string(), |st| format!("{st:?}").to_lowercase());
    let protection = if s.protected { "protected" } else { "NOT PROTECTED" };
    format!(
        "{addr}: {role} {state}, {protection}, epoch {epoch}\n  position {pos}, peer {peer}, lag {lag} positions ({lag_ms:.1} ms)\n  \
         log {bytes} bytes ({rate:.0} B/s), output held {held} / released {rel}, hold mean {mean:.0} us max {max} us\n  \
         missed heartbeats {missed}, throttled {thr} ms\n  last: {note}",
        role = s.role,
        epoch = s.epoch,
        pos = s.position,
        peer = s.peer_position,
        lag = s.lag_positions,
        lag_ms = s.lag_ms,
        bytes = s.log_bytes,
        rate = s.log_bytes_per_sec,
        held = s.frames_held,
        rel = s.frames_released,
        mean = s.hold_us_mean,
        max = s.hold_us_max,
        missed = s.missed_heartbeats,
        thr = s.throttled_ms,
        note = s.note,
    ) + &s.sync.as_ref().map(|p| format!("\n  joining: {}", p.line())).unwrap_or_default()
        + &match s.uplink_up {
            Some(up) => format!(
                "\n  network {}{}",
                if up { "up" } else { "DOWN" },
                s.peer_uplink_up.map_or(String::new(), |p| format!(", peer's {}", if p { "up" } else { "DOWN" }))
            ),
            None => String::new(),
        }
        + &if s.decision.is_empty() { String::new() } else { format!("\n  policy: {}", s.decision) }
}

/// A one-line summary of a side.
pub fn one_line(s: &Status) -> String {
    let state = s.state.map_or("unknown".to_string(), |st| format!("{st:?}").to_lowercase());
    let mut line = format!("{} {state}, epoch {}", s.role, s.epoch);
    if s.protected {
        line.push_str(&format!(", lag {:.2} ms, log {:.0} B/s", s.lag_ms, s.log_bytes_per_sec));
    } else {
        line.push_str(", NOT PROTECTED");
    }
    if s.role == "primary" {
        line.push_str(&format!(", {} frames released, mean hold {:.0} us", s.frames_released, s.hold_us_mean));
    }
    if let Some(p) = &s.sync {
        line.push_str(&format!(", joining: {}", p.line()));
    }
    line
}
