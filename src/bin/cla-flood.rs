//! `cla-flood ADDR COUNT [PREFIX]`: a hostile client for the integration tests. Opens COUNT TCP connections
//! to ADDR (a loopback address), sends each the first bytes of an HTTP request (PREFIX, by default half a
//! request line: `GET /healthz HTTP/1.1\r\n`) and never the rest, prints `held N failed M`, then holds every
//! socket until its stdin closes (the test that started it ends, or drops it).
//!
//! Its own process, so that the connections use its file descriptors, not the test's.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(addr), Some(count)) = (args.first(), args.get(1)) else {
        eprintln!("usage: cla-flood ADDR COUNT [PREFIX]");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is ip:port");
    assert!(addr.ip().is_loopback(), "cla-flood only talks to loopback");
    let count: usize = count.parse().expect("COUNT is a number");
    let prefix = args.get(2).map_or("GET /healthz HTTP/1.1\r\n", String::as_str);
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    for _ in 0..count {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(mut s) => {
                // A write to a connection the hub already closed may fail: it still counts as tried.
                let _ = s.write_all(prefix.as_bytes());
                held.push(s);
            }
            Err(_) => failed += 1,
        }
    }
    println!("held {} failed {failed}", held.len());
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
