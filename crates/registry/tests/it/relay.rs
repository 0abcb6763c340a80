//! A TCP relay between pf and a real registry that slows its traffic down or goes silent
//! midway, for the idle-timeout tests: the registry is real, only the wire misbehaves.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the relay does to the bytes it carries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wire {
    /// Carry every byte, both ways, but at most `bytes` every `every`.
    Slow { bytes: usize, every: Duration },
    /// Carry bytes until `after` of them went one way (towards the registry when `upstream`,
    /// else towards pf) over all connections, then carry nothing more that way and read nothing
    /// more from that side; the connections stay open.
    Stall { upstream: bool, after: u64 },
}

/// A running relay; dropping it closes every connection and stops it.
pub(crate) struct Relay {
    port: u16,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// Relay a free loopback port to `127.0.0.1:target`.
    pub(crate) fn start(target: u16, wire: Wire) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let carried = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
        let accept = {
            let stop = Arc::clone(&stop);
            let streams = Arc::clone(&streams);
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    // A small receive buffer, so that a relay that stops reading blocks pf's
                    // writes soon (the kernel would otherwise take megabytes unread).
                    let _ = socket2::SockRef::from(&client).set_recv_buffer_size(64 << 10);
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                        continue;
                    };
                    {
                        let mut all = streams.lock().unwrap();
                        all.push(client.try_clone().unwrap());
                        all.push(server.try_clone().unwrap());
                    }
                    for (from, to, upstream) in [
                        (
                            client.try_clone().unwrap(),
                            server.try_clone().unwrap(),
                            true,
                        ),
                        (server, client, false),
                    ] {
                        let stop = Arc::clone(&stop);
                        let carried = Arc::clone(&carried[usize::from(upstream)]);
                        std::thread::spawn(move || pump(from, to, upstream, wire, &carried, &stop));
                    }
                }
            })
        };
        Self {
            port,
            stop,
            streams,
            accept: Some(accept),
        }
    }

    /// `127.0.0.1:PORT` of the relay.
    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Carry bytes from `from` to `to` as `wire` says, until either side closes or the relay stops.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    upstream: bool,
    wire: Wire,
    carried: &AtomicU64,
    stop: &AtomicBool,
) {
    let size = match wire {
        Wire::Slow { bytes, .. } => bytes,
        Wire::Stall { .. } => 16 << 10,
    };
    let mut buf = vec![0u8; size];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        match wire {
            Wire::Slow { every, .. } => std::thread::sleep(every),
            Wire::Stall {
                upstream: way,
                after,
            } if way == upstream => {
                let before = carried.fetch_add(n as u64, Ordering::SeqCst);
                if before + n as u64 > after {
                    // Silent from here on: neither forward nor read, until the relay stops.
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    return;
                }
            }
            Wire::Stall { .. } => {}
        }
        if to.write_all(&buf[..n]).is_err() {
            let _ = from.shutdown(Shutdown::Read);
            return;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        // Wake the accept loop so it sees the stop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}
