//! The status endpoint of a pair side: `GET /metrics` (Prometheus text)
//! and `GET /status` (JSON, what `lockstep status` reads).

use anyhow::{Context, Result};
use ft::Status;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

pub type StatusFn = Box<dyn Fn() -> Status + Send + Sync>;

/// Serve the side's figures on `addr` from a thread of its own.
pub fn serve(addr: &str, status: StatusFn) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot serve metrics on {addr}"))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = answer(stream, &status);
        }
    });
    Ok(())
}

fn answer(mut stream: TcpStream, status: &StatusFn) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    let mut reader = BufReader::new(stream.try_clone()?);
    reader.read_line(&mut line)?;
    // Read the rest of the request head: closing with unread bytes would
    // reset the connection under the client's feet.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (code, kind, body) = match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", status().prometheus()),
        "/status" => ("200 OK", "application/json", serde_json::to_string(&status()).unwrap_or_default()),
        _ => ("404 Not Found", "text/plain", "try /metrics or /status\n".to_string()),
    };
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
    )
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
    line
}
