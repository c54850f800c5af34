//! The real binary: `serve` stops gracefully on SIGTERM and exits 0 after the in-flight request;
//! `healthcheck` probes the admin listener the way a container health check does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use greenhouse_gateway::sandbox::{Sandbox, SandboxOptions};
use http::{Method, StatusCode};
use support::{Setup, Stub, TestClient};

#[tokio::test]
async fn serve_on_sigterm_finishes_the_in_flight_request_and_exits_0() {
    let stub = Stub::start().await;
    stub.set_reply(200, "[\"finished\"]", Duration::from_millis(800));
    let sandbox = Sandbox::start_local(SandboxOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        upstream: Some(stub.base_url()),
        // No readiness drain: this is about the request in flight (the drain has its own test
        // in observability.rs).
        listen_extra: "drain = \"0s\"".into(),
        ..Setup::default()
    };
    support::write_config(dir.path(), &sandbox, &setup);

    let mut served = support::spawn_serve(&dir.path().join("gateway.toml"));
    let (addr, admin) = (served.addr.clone(), served.admin.clone());
    let client = TestClient::new();
    served.wait_ready().await;

    let token = sandbox.mint_token(
        serde_json::json!({"sub": "svc-sourcing-bot", "aud": support::AUDIENCE}),
        Duration::from_secs(60),
    );
    let url = format!("http://{addr}/v1/partner/jobs");
    let c = client.clone();
    let in_flight = tokio::spawn(async move {
        c.send(
            Method::GET,
            &url,
            &[("authorization", &format!("Bearer {token}"))],
            Bytes::new(),
        )
        .await
    });
    for _ in 0..200 {
        if !stub.seen().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        stub.seen().len(),
        1,
        "the request did not reach the upstream"
    );
    // A SIGHUP reloads the configuration (unchanged here) while the request is in flight; the
    // process keeps running and the request finishes.
    let hup = Command::new("kill")
        .args(["-HUP", &served.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    assert_eq!(
        generation(&client, &admin, 2).await,
        2,
        "SIGHUP did not reload"
    );
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "SIGHUP ended the gateway"
    );
    assert!(served.logs_soon("configuration reloaded").await);
    let killed = Command::new("kill")
        .args(["-TERM", &served.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let r = in_flight.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "[\"finished\"]");
    let mut status = None;
    for _ in 0..200 {
        if let Some(s) = served.child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let status = status.unwrap_or_else(|| {
        let _ = served.child.kill();
        panic!("the gateway did not exit within 5 s of SIGTERM")
    });
    assert_eq!(status.code(), Some(0));
    // Shutdown flushed the audit trail: the in-flight request has its record, and it verifies.
    let trail = std::fs::read_to_string(dir.path().join("audit/audit.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(trail.lines().last().unwrap()).unwrap();
    assert_eq!(last["operation"], "listPartnerJobs");
    assert_eq!(last["status"], 200);
    let verify = Command::new(support::binary())
        .args(["audit", "verify"])
        .arg(dir.path().join("audit/audit.jsonl"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

/// The binary with `args`, its standard output delivered line by line.
/// A child process of the gateway binary whose standard output arrives line by line and whose
/// standard error is kept (to say why it did not start).
struct Spawned {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// The thread draining standard error: it ends when the process does.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Spawned {
    fn start(args: &[String]) -> Spawned {
        use std::io::{BufRead, BufReader, Read};
        let mut child = Command::new(support::binary())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // Drained all along (so the child never blocks on a full pipe), kept to the last 16 KiB.
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let kept = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                let mut s = kept.lock().unwrap();
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
                if s.len() > 16 * 1024 {
                    let cut = s.len() - 16 * 1024;
                    let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                    s.drain(..cut);
                }
            }
        });
        Spawned {
            child,
            lines,
            stderr,
            stderr_reader: Some(stderr_reader),
        }
    }

    /// The lines printed until one satisfies `ready` (included), or why that did not happen
    /// within 30 s: the exit status and standard error when the process ended.
    fn wait_for(&mut self, ready: impl Fn(&str) -> bool) -> Result<Vec<String>, String> {
        let mut seen = Vec::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    let done = ready(&line);
                    seen.push(line);
                    if done {
                        return Ok(seen);
                    }
                }
                Err(e) => {
                    // Standard output closed (the process ended: all its standard error is read
                    // once the reader ends) or 30 s passed (what it said so far).
                    let status = match e {
                        std::sync::mpsc::RecvTimeoutError::Timeout => None,
                        std::sync::mpsc::RecvTimeoutError::Disconnected => {
                            let status = self.child.wait().ok();
                            if let Some(reader) = self.stderr_reader.take() {
                                let _ = reader.join();
                            }
                            status
                        }
                    };
                    let stderr = self.stderr.lock().unwrap().clone();
                    return Err(format!("status {status:?}; stderr:\n{stderr}"));
                }
            }
        }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary with the arguments `setup` prepares (with what it prepared them in) until
/// it prints a line `ready` accepts. Test ports come from binding port 0 and letting go, so
/// another test's socket may take one in between: a start that failed because an address was in
/// use is set up and tried again (three times at most); any other failure panics with the
/// process's standard error.
fn start_retrying<T>(
    setup: impl Fn() -> (T, Vec<String>),
    ready: impl Fn(&str) -> bool,
) -> (T, Spawned, Vec<String>) {
    let mut last = String::new();
    for _ in 0..3 {
        let (prepared, args) = setup();
        let mut spawned = Spawned::start(&args);
        match spawned.wait_for(&ready) {
            Ok(seen) => return (prepared, spawned, seen),
            Err(why) => {
                spawned.stop();
                assert!(
                    why.contains("Address already in use"),
                    "{args:?} did not start: {why}"
                );
                last = why;
            }
        }
    }
    panic!("no free ports in three tries: {last}");
}

/// `dev` in a copy of the playground, once it printed its instructions.
fn dev_in_playground() -> (tempfile::TempDir, [u16; 3], Spawned, Vec<String>) {
    let ((dir, ports), spawned, lines) = start_retrying(
        || {
            let (dir, ports) = playground_copy();
            let config = dir.path().join("gateway.toml").display().to_string();
            ((dir, ports), vec!["dev".into(), "--config".into(), config])
        },
        |line| line.starts_with("Ctrl-C"),
    );
    (dir, ports, spawned, lines)
}

/// Polls `/admin/teams` until the policy generation reaches `want` (or 5 s pass); the last seen.
async fn generation(client: &TestClient, admin: &str, want: u64) -> u64 {
    let mut seen = 0;
    for _ in 0..200 {
        let r = client
            .send(
                Method::GET,
                &format!("http://{admin}/admin/teams"),
                &[],
                Bytes::new(),
            )
            .await;
        seen = r.json()["generation"].as_u64().unwrap_or(0);
        if seen >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    seen
}

/// The shipped playground config, moved to free ports in a temporary copy of `policies/`.
fn playground_copy() -> (tempfile::TempDir, [u16; 3]) {
    let dir = tempfile::tempdir().unwrap();
    let ports = [
        support::redis::free_port(),
        support::redis::free_port(),
        support::redis::free_port(),
    ];
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    std::fs::create_dir_all(dir.path().join("teams")).unwrap();
    let moved = |text: String| {
        text.replace("127.0.0.1:8080", &format!("127.0.0.1:{}", ports[0]))
            .replace("127.0.0.1:8089", &format!("127.0.0.1:{}", ports[1]))
            .replace("127.0.0.1:9090", &format!("127.0.0.1:{}", ports[2]))
    };
    for name in ["gateway.toml", "greenhouse-partner.openapi.yml"] {
        let text = std::fs::read_to_string(src.join(name)).unwrap_or_default();
        std::fs::write(dir.path().join(name), moved(text)).unwrap();
    }
    for entry in std::fs::read_dir(src.join("teams")).unwrap() {
        let entry = entry.unwrap();
        let text = std::fs::read_to_string(entry.path()).unwrap();
        std::fs::write(
            dir.path().join("teams").join(entry.file_name()),
            moved(text),
        )
        .unwrap();
    }
    (dir, ports)
}

/// The platform engineer's loop in the playground: edit a team's quota, `check`, SIGHUP, and the
/// next request is judged by the new limit while what was counted stays counted.
#[tokio::test]
async fn dev_applies_an_edited_quota_on_sighup_keeping_what_was_counted() {
    let (dir, ports, child, lines) = dev_in_playground();
    let token = lines.iter().find_map(|line| {
        line.strip_prefix("export AGENCY_TOKEN='")
            .and_then(|rest| rest.strip_suffix('\''))
            .map(str::to_string)
    });
    let token = token.expect("dev printed the agency token");
    let client = TestClient::new();
    let create = |n: u32| {
        let (client, token) = (client.clone(), token.clone());
        let url = format!("http://127.0.0.1:{}/v1/partner/candidates", ports[0]);
        async move {
            let body = serde_json::json!({"first_name": "Ada", "last_name": "Example", "external_id": format!("ext-{n}")});
            client
                .send(
                    Method::POST,
                    &url,
                    &[
                        ("authorization", &format!("Bearer {token}")),
                        ("content-type", "application/json"),
                    ],
                    Bytes::from(body.to_string()),
                )
                .await
        }
    };
    for n in 0..2 {
        let r = create(n).await;
        assert!(r.status.is_success(), "{} {}", r.status, r.text());
    }
    // createPartnerCandidate: 500 a day -> 3 a day; two are already counted.
    let team = dir.path().join("teams/agency.toml");
    let text = std::fs::read_to_string(&team).unwrap();
    assert!(text.contains("daily = 500"));
    std::fs::write(&team, text.replace("daily = 500", "daily = 3")).unwrap();
    let check = Command::new(support::binary())
        .args(["check", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .output()
        .unwrap();
    assert!(check.status.success());
    let hup = Command::new("kill")
        .args(["-HUP", &child.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let admin = format!("127.0.0.1:{}", ports[2]);
    assert_eq!(
        generation(&client, &admin, 2).await,
        2,
        "SIGHUP did not reload"
    );
    let third = create(2).await;
    assert!(third.status.is_success(), "{}", third.text());
    let fourth = create(3).await;
    assert_eq!(fourth.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(fourth.code(), "daily_quota_exhausted");
    child.stop();
}

#[tokio::test]
async fn dev_and_sandbox_survive_sighup() {
    let (_dir, ports, dev, _) = dev_in_playground();
    let ((), sandbox, _) = start_retrying(
        || {
            let listen = format!("127.0.0.1:{}", support::redis::free_port());
            ((), vec!["sandbox".into(), "--listen".into(), listen])
        },
        |line| line.contains("sandbox listening"),
    );
    let mut children = vec![("dev", dev), ("sandbox", sandbox)];
    for (name, spawned) in &mut children {
        for _ in 0..2 {
            let hup = Command::new("kill")
                .args(["-HUP", &spawned.child.id().to_string()])
                .status()
                .unwrap();
            assert!(hup.success());
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert!(
            spawned.child.try_wait().unwrap().is_none(),
            "SIGHUP ended `{name}`"
        );
    }
    // The playground still answers after the signals.
    let r = TestClient::new()
        .send(
            Method::GET,
            &format!("http://127.0.0.1:{}/healthz", ports[2]),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    for (_, spawned) in children {
        spawned.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// `healthcheck`: the container health check without curl
// ---------------------------------------------------------------------------------------------

/// Runs `greenhouse-gateway healthcheck ARGS` without blocking the test's runtime.
async fn healthcheck(args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(support::binary())
        .arg("healthcheck")
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// A listener that answers every connection with `response` (or holds it open when `None`).
async fn canned_listener(response: Option<&'static str>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                match response {
                    Some(r) => {
                        let _ = stream.write_all(r.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(30)).await,
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn healthcheck_against_a_running_gateways_admin_listener_exits_0() {
    let sandbox = Sandbox::start_local(SandboxOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    support::write_config(dir.path(), &sandbox, &Setup::default());
    let served = support::spawn_serve(&dir.path().join("gateway.toml"));

    let (code, stdout, stderr, _) = healthcheck(&["--addr", &served.admin]).await;
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains(&format!("http://{}/healthz answered 200", served.admin)),
        "{stdout}"
    );
}

#[tokio::test]
async fn healthcheck_with_config_probes_its_admin_addr_on_loopback_when_bound_to_0_0_0_0() {
    let sandbox = Sandbox::start_local(SandboxOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    support::write_config(dir.path(), &sandbox, &Setup::default());
    // The container's shape: the admin listener on every interface, with its token (which
    // /healthz does not need).
    let port = support::redis::free_port();
    let path = dir.path().join("gateway.toml");
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "[admin]\naddr = \"127.0.0.1:0\"",
        &format!(
            "[admin]\naddr = \"0.0.0.0:{port}\"\ntoken = {{ value = \"healthcheck-test-admin-token-0123456789\" }}"
        ),
        1,
    );
    assert!(text.contains(&format!("0.0.0.0:{port}")), "{text}");
    std::fs::write(&path, text).unwrap();
    let served = support::spawn_serve(&path);
    assert!(
        served.admin.ends_with(&format!(":{port}")),
        "{}",
        served.admin
    );

    let config = path.display().to_string();
    let (code, stdout, stderr, _) = healthcheck(&["--config", &config]).await;
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains(&format!("http://127.0.0.1:{port}/healthz answered 200")),
        "{stdout}"
    );
}

#[tokio::test]
async fn healthcheck_against_a_closed_port_exits_1_saying_it_cannot_connect() {
    let port = support::redis::free_port();
    let addr = format!("127.0.0.1:{port}");
    let (code, stdout, stderr, _) = healthcheck(&["--addr", &addr]).await;
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "healthcheck failed: http://{addr}/healthz: cannot connect"
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn healthcheck_exits_1_naming_the_status_when_healthz_is_not_200() {
    let addr = canned_listener(Some(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    ))
    .await
    .to_string();
    let (code, _, stderr, _) = healthcheck(&["--addr", &addr]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "healthcheck failed: http://{addr}/healthz answered 503 Service Unavailable, not 200"
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn healthcheck_gives_up_on_a_silent_listener_within_its_timeout_with_exit_1() {
    let addr = canned_listener(None).await.to_string();
    let (code, _, stderr, took) = healthcheck(&["--addr", &addr, "--timeout", "300ms"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no answer within 300ms"), "{stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[tokio::test]
async fn healthcheck_with_an_unreadable_config_exits_1_naming_the_file() {
    let (code, _, stderr, _) = healthcheck(&["--config", "/nonexistent/gateway.toml"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("healthcheck failed: cannot read /nonexistent/gateway.toml"),
        "{stderr}"
    );
}

/// Resident anonymous memory (the heap, stacks) of a process, KiB. Not USS: the binary's own
/// pages count in USS only while no other process maps the same file, so another test's
/// gateway exiting would move it by megabytes.
fn anon_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    text.lines()
        .filter(|l| l.starts_with("Anonymous:"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The anonymous memory of a process once it has stopped moving (two readings 200 ms apart within 64 KiB of
/// each other; the audit writer and the log may still be catching up on the last requests).
async fn settled_anon_kib(pid: u32) -> u64 {
    let mut last = anon_kib(pid);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = anon_kib(pid);
        if now.abs_diff(last) <= 64 {
            return now;
        }
        last = now;
    }
    last
}

/// Opens `n` connections to `addr`, each making one request and reading the whole answer, and
/// returns them open and idle. The request's head is about 1.6 KiB, as a caller's JWT makes it
/// (the token here is not one: it is refused).
async fn idle_connections(addr: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "GET /v1/partner/jobs HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {}\r\n\r\n",
        "x".repeat(1536)
    );
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let k = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(k > 0, "the gateway closed a keep-alive connection");
            got.extend_from_slice(&buf[..k]);
            let text = String::from_utf8_lossy(&got);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                assert!(head.starts_with("HTTP/1.1 401"), "{head}");
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap();
                if body.len() >= len {
                    break;
                }
            }
        }
        out.push(s);
    }
    out
}

#[tokio::test]
async fn idle_keep_alive_connections_keep_no_buffers_nor_their_last_request_head() {
    let sandbox = Sandbox::start_local(SandboxOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    support::write_config(dir.path(), &sandbox, &Setup::default());
    let served = support::spawn_serve(&dir.path().join("gateway.toml"));
    let pid = served.child.id();
    // ready first (keys fetched, upstream token taken: what that allocates is not per
    // connection), then warmed up
    served.wait_ready().await;
    let _warm = idle_connections(&served.addr, 100).await;
    let before = settled_anon_kib(pid).await;
    const N: u64 = 500;
    let _held = idle_connections(&served.addr, N as usize).await;
    let per_conn = (settled_anon_kib(pid).await.saturating_sub(before)) as f64 / N as f64;
    // hyper as published keeps an 8 KiB read buffer and an 8 KiB head buffer per connection
    // (about 19 KiB per idle connection in all, measured here); with those given back, about 7,
    // most of it the connection's task (hyper-util's connection for either HTTP version, kept
    // twice, and a `select!` loop) and the header map hyper kept for reuse (README,
    // "Performance"); then about 2.6, and 1.6 KiB more with this head (its bytes, read into a
    // buffer of their size, were held by the empty rest of that buffer)
    eprintln!("{per_conn:.2} KiB per idle connection");
    assert!(
        per_conn < 3.2,
        "{per_conn:.1} KiB per idle connection: buffers, header maps or task state are kept"
    );
}
