//! `lowrank serve` as a process: start-up checks, what it prints, and the file-descriptor
//! limit it raises. Servers listen on 127.0.0.1 only and are killed at the end of each test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod common;
use common::*;

/// A `lowrank serve` process that has printed its "serving … on" line.
struct Served {
    child: Child,
    addr: String,
    /// Its standard error up to and including that line.
    startup: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An adapter folder copied from the fixtures.
fn copy_adapter(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let from = fixtures().join("adapters/llama-tied__lora-qv").join(f);
        std::fs::copy(from, to.join(f)).unwrap();
    }
}

fn serve_args<'a>(adapters: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--model",
        &fx("models/llama-tied"),
        "--adapters",
        adapters,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--host", "127.0.0.1", "--port", "0"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts `lowrank serve` (under `sh -c "<shell>; exec …"` when `shell` is given) and waits
/// (60 s at most) for its "serving … on http://ADDR" line.
fn start(args: &[String], shell: Option<&str>) -> Served {
    let bin = env!("CARGO_BIN_EXE_lowrank");
    let mut command = match shell {
        Some(setup) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("{setup} && exec \"$0\" \"$@\""))
                .arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let mut child = command
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run lowrank serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut startup = String::new();
    loop {
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no \"serving\" line; stderr so far:\n{startup}");
            }
        };
        startup.push_str(&line);
        startup.push('\n');
        if let Some(rest) = line.strip_prefix("serving ") {
            let addr = rest
                .split("on http://")
                .nth(1)
                .and_then(|a| a.split_whitespace().next())
                .expect("an address")
                .to_string();
            return Served {
                child,
                addr,
                startup,
            };
        }
    }
}

/// `GET /health` on a fresh connection: the status line and body.
fn health(addr: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("an answer within 30 s");
    answer
}

#[cfg(unix)]
#[test]
fn serve_prints_the_bound_port_and_warns_about_skipped_folders() {
    let root = tempfile::tempdir().unwrap();
    let adapters = root.path().join("adapters");
    copy_adapter(&adapters.join("good"));
    copy_adapter(&adapters.join("bad name!"));
    // The base's id (the model folder's name): it would shadow the base.
    copy_adapter(&adapters.join("llama-tied"));
    copy_adapter(&root.path().join("outside"));
    std::os::unix::fs::symlink(root.path().join("outside"), adapters.join("escape")).unwrap();
    let adapters_arg = adapters.to_string_lossy().into_owned();
    let served = start(&serve_args(&adapters_arg, &[]), None);
    assert!(
        served
            .startup
            .contains("serving llama-tied on http://127.0.0.1:"),
        "{}",
        served.startup
    );
    assert!(!served.addr.ends_with(":0"), "{}", served.addr);
    for needle in [
        "bad name!: adapter folder skipped: invalid adapter id",
        "llama-tied: adapter folder skipped: adapter id \"llama-tied\" is the base model's id",
        "escape: adapter folder skipped:",
        "is outside the adapter root",
    ] {
        assert!(
            served.startup.contains(needle),
            "{needle}: {}",
            served.startup
        );
    }
    let answer = health(&served.addr);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_port_in_use_fails_before_serving() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let root = tempfile::tempdir().unwrap();
    let adapters = root.path().to_string_lossy().into_owned();
    let mut args = serve_args(&adapters, &[]);
    let at = args.iter().position(|a| a == "--port").unwrap();
    args[at + 1] = port.clone();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lowrank(&args);
    assert_fails_with(&out, &["--port", &port, "cannot listen"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("serving"));
}

#[test]
fn zero_limits_are_refused_naming_the_flag() {
    let root = tempfile::tempdir().unwrap();
    let adapters = root.path().to_string_lossy().into_owned();
    for flag in [
        "--max-tokens-limit",
        "--kv-cache-mb",
        "--request-timeout-s",
        "--max-body-bytes",
        "--max-batch",
        "--max-loaded-adapters",
        "--max-connections",
        "--header-timeout-s",
        "--body-timeout-s",
    ] {
        let args = serve_args(&adapters, &[flag, "0"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_fails_with(&lowrank(&args), &[&format!("{flag} 0")]);
    }
}

/// The soft and hard "Max open files" of a process, from /proc.
#[cfg(target_os = "linux")]
fn open_files_limits(pid: &str) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[cfg(target_os = "linux")]
#[test]
fn the_open_files_limit_is_raised_so_half_open_clients_do_not_starve_the_server() {
    let (_, hard) = open_files_limits("self");
    // Room for the partial connections below, the server's own files and the default cap.
    assert!(
        hard >= 512,
        "this test needs a hard open-files limit of 512 or more, not {hard}"
    );
    let root = tempfile::tempdir().unwrap();
    let adapters = root.path().to_string_lossy().into_owned();
    // Started with a soft limit too small for the connections below.
    let served = start(&serve_args(&adapters, &[]), Some("ulimit -Sn 64"));
    let (soft, hard) = open_files_limits(&served.child.id().to_string());
    assert_eq!(soft, hard, "the soft limit was not raised");
    let mut partial = Vec::new();
    for _ in 0..150 {
        let mut stream = TcpStream::connect(&served.addr).unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        partial.push(stream);
    }
    let answer = health(&served.addr);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[cfg(unix)]
#[test]
fn more_connections_than_open_files_allow_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let adapters = root.path().to_string_lossy().into_owned();
    let args = serve_args(&adapters, &["--max-connections", "1000"]);
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_lowrank"))
        .args(&args)
        .output()
        .unwrap();
    assert_fails_with(&out, &["--max-connections 1000", "256 files"]);
}
