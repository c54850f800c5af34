//! A `redis-server` of a test's own on a free port (killed on drop), or `REDIS_URL` for tests
//! that do not stop their Redis; failing loudly when neither is there.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn redis_server_on_path() -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| dir.join("redis-server").is_file())
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of this test's own, killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        assert!(
            redis_server_on_path(),
            "this test stops or pauses its Redis: it needs redis-server on PATH"
        );
        for _ in 0..5 {
            if let Some(s) = RedisServer::start_on(free_port()) {
                return s;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Starts on `port` and returns once it accepts connections (its log says so).
    pub fn start_on(port: u16) -> Option<RedisServer> {
        RedisServer::spawn(port, &["--port", &port.to_string()])
    }

    /// A server that speaks only TLS on its port (no plain TCP), with a certificate for
    /// `127.0.0.1` and `localhost` signed by a fresh private CA. Returns the server and the CA
    /// certificate's PEM; the key and certificate files live in `dir`.
    pub fn start_tls(dir: &std::path::Path) -> (RedisServer, String) {
        assert!(
            redis_server_on_path(),
            "this test needs redis-server on PATH"
        );
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test redis CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (cert_file, key_file) = (dir.join("redis.crt"), dir.join("redis.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let (cert_file, key_file) = (cert_file.to_string_lossy(), key_file.to_string_lossy());
        for _ in 0..5 {
            let port = free_port().to_string();
            let args = [
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-cert-file",
                &cert_file,
                "--tls-key-file",
                &key_file,
                "--tls-auth-clients",
                "no",
            ];
            if let Some(s) = RedisServer::spawn(port.parse().unwrap(), &args) {
                return (s, ca_cert.pem());
            }
        }
        panic!("redis-server with TLS did not start on any of 5 free ports");
    }

    fn spawn(port: u16, listen: &[&str]) -> Option<RedisServer> {
        let mut child = Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("Ready to accept connections"));
        if !ready {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        // keep draining the log so the server never blocks on a full pipe
        std::thread::spawn(move || lines.for_each(drop));
        Some(RedisServer { child, port })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A fresh, empty server on the same port.
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..20 {
            if let Some(s) = RedisServer::start_on(self.port) {
                *self = s;
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }

    /// SIGSTOP: the server stops answering but keeps its connections.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {sig} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis for tests that do not stop it: our own server, else `REDIS_URL`.
pub struct TestRedis {
    pub url: String,
    _server: Option<RedisServer>,
}

pub fn test_redis() -> TestRedis {
    if redis_server_on_path() {
        let server = RedisServer::start();
        return TestRedis {
            url: server.url(),
            _server: Some(server),
        };
    }
    match std::env::var("REDIS_URL") {
        Ok(url) => TestRedis { url, _server: None },
        Err(_) => panic!("Redis tests need redis-server on PATH or REDIS_URL"),
    }
}
