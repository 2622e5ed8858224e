//! The servers the suite compares: how to build and start each one.
//!
//! Every peer is an echo server taking `PORT [deflate]`; some also have a
//! fan-out server taking `PORT` (every connection is a member of one room).
//! `bench/README.md` documents each one's version and settings.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A server under test.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Short name used on the command line and in tables.
    pub name: &'static str,
    /// How it is described in reports.
    pub label: &'static str,
    /// The program and its arguments before `PORT [deflate]`.
    program: Program,
    /// Whether the echo and idle cases run it (`walkie-durable` is for the
    /// fan-out cases: its echo is walkie's).
    pub echo: bool,
    /// The fan-out server, if this peer has one.
    fanout: Option<Program>,
}

#[derive(Debug, Clone)]
enum Program {
    /// `walkie serve`: `--in-memory`, or with `durable` the default
    /// engine, history in redb in a fresh data directory.
    Walkie { durable: bool },
    /// A binary of the `bench/peers` crate.
    RustPeer(&'static str),
    /// A Node script in `bench/node`.
    Node(&'static str),
    /// A Python script in `bench/python`, run in the suite's venv.
    Python(&'static str),
}

/// Every peer, ours first.
pub fn all() -> Vec<Peer> {
    vec![
        Peer {
            name: "walkie",
            label: "walkie (this repo)",
            program: Program::Walkie { durable: false },
            echo: true,
            fanout: Some(Program::Walkie { durable: false }),
        },
        Peer {
            name: "walkie-durable",
            label: "walkie, default engine (history in redb)",
            program: Program::Walkie { durable: true },
            echo: false,
            fanout: Some(Program::Walkie { durable: true }),
        },
        Peer {
            name: "uws",
            label: "uWebSockets (uWS.js)",
            program: Program::Node("uws-echo.js"),
            echo: true,
            fanout: Some(Program::Node("uws-fanout.js")),
        },
        Peer {
            name: "fastwebsockets",
            label: "fastwebsockets",
            program: Program::RustPeer("fastwebsockets-echo"),
            echo: true,
            fanout: None,
        },
        Peer {
            name: "yawc",
            label: "yawc",
            program: Program::RustPeer("yawc-echo"),
            echo: true,
            fanout: None,
        },
        Peer {
            name: "tungstenite",
            label: "tokio-tungstenite",
            program: Program::RustPeer("tungstenite-echo"),
            echo: true,
            fanout: None,
        },
        Peer {
            name: "tokio-websockets",
            label: "tokio-websockets",
            program: Program::RustPeer("tokio-websockets-echo"),
            echo: true,
            fanout: None,
        },
        Peer {
            name: "ws",
            label: "Node ws",
            program: Program::Node("ws-echo.js"),
            echo: true,
            fanout: Some(Program::Node("ws-fanout.js")),
        },
        Peer {
            name: "python",
            label: "Python websockets",
            program: Program::Python("websockets-echo.py"),
            echo: true,
            fanout: None,
        },
        Peer {
            name: "reflector",
            label: "raw byte reflector (no protocol)",
            program: Program::RustPeer("reflector"),
            echo: true,
            fanout: None,
        },
    ]
}

/// Paths the suite builds and runs things from.
#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
    pub out: PathBuf,
}

impl Paths {
    fn venv_python(&self) -> PathBuf {
        self.out.join("venv/bin/python")
    }
}

impl Peer {
    /// The command that starts this peer's echo server on `port`, pinned
    /// to `cpu`.
    pub fn command(&self, paths: &Paths, port: u16, deflate: bool, cpu: usize) -> Command {
        program_command(&self.program, paths, port, deflate, cpu)
    }

    /// Whether this peer has a fan-out server.
    pub fn has_fanout(&self) -> bool {
        self.fanout.is_some()
    }

    /// Whether this peer speaks the Walkie protocol (walkie alone).
    pub fn has_protocol(&self) -> bool {
        matches!(self.fanout, Some(Program::Walkie { .. }))
    }

    /// The command that starts this peer's fan-out server on `port`, pinned
    /// to `cpu`; `None` if it has none. `protocol`: with the Walkie
    /// protocol's fan-out channel configured (`None` for other peers).
    pub fn fanout_command(
        &self,
        paths: &Paths,
        port: u16,
        cpu: usize,
        protocol: bool,
    ) -> Option<Command> {
        let program = self.fanout.as_ref()?;
        if protocol && !self.has_protocol() {
            return None;
        }
        let mut cmd = program_command(program, paths, port, false, cpu);
        if let Program::Walkie { .. } = program {
            // A room at /rooms/fanout is the fan-out: keep one message of
            // history (the least there is), and queues long enough that
            // they are not what limits a subscriber (an overflow
            // disconnects it, 1013).
            cmd.args(["--room-history", "1"])
                .args(["--client-queue", "100000"])
                .args(["--client-queue-bytes", "64M"]);
            if protocol {
                cmd.arg("--config")
                    .arg(paths.root.join("bench/walkie-fanout.toml"));
            }
        }
        Some(cmd)
    }

    /// What must exist before this peer can start, for the build step.
    pub fn needs(&self) -> Need {
        match self.program {
            Program::Walkie { .. } => Need::Walkie,
            Program::RustPeer(_) => Need::RustPeers,
            Program::Node(_) => Need::Node,
            Program::Python(_) => Need::Python,
        }
    }
}

/// The command that starts `program` on `port`, pinned to `cpu`.
fn program_command(
    program: &Program,
    paths: &Paths,
    port: u16,
    deflate: bool,
    cpu: usize,
) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(cpu.to_string());
    let root = &paths.root;
    match program {
        Program::Walkie { durable } => {
            cmd.arg(root.join("target/release/walkie"))
                .args(["serve", "--bind"])
                .arg(format!("127.0.0.1:{port}"));
            if *durable {
                // A fresh database per server: a run starts with no
                // history, as a fresh `--in-memory` server does.
                let dir = paths.out.join(format!("walkie-data-{port}"));
                let _ = std::fs::remove_dir_all(&dir);
                cmd.arg("--data-dir").arg(dir);
            } else {
                // Echo keeps no history; several benchmark servers may
                // run at once.
                cmd.arg("--in-memory");
            }
            if !deflate {
                cmd.arg("--no-deflate");
            }
            cmd.env("WALKIE_LOG", "warn");
            return cmd;
        }
        Program::RustPeer(bin) => {
            cmd.arg(root.join("bench/peers/target/release").join(bin));
        }
        Program::Node(script) => {
            cmd.arg("node").arg(root.join("bench/node").join(script));
        }
        Program::Python(script) => {
            cmd.arg(paths.venv_python())
                .arg(root.join("bench/python").join(script));
        }
    }
    cmd.arg(port.to_string());
    if deflate {
        cmd.arg("deflate");
    }
    cmd
}

/// A build step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Walkie,
    RustPeers,
    Node,
    Python,
}

/// Runs a build step, printing what it does.
pub fn prepare(need: Need, paths: &Paths) -> Result<(), String> {
    let root = &paths.root;
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        eprintln!("walkie-bench: {what}");
        let status = cmd.status().map_err(|e| format!("{what}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{what}: failed ({status})"))
        }
    };
    match need {
        Need::Walkie => run(
            Command::new("cargo").current_dir(root).args([
                "build",
                "--release",
                "-q",
                "-p",
                "walkie-cli",
            ]),
            "building walkie",
        ),
        Need::RustPeers => run(
            Command::new("cargo").current_dir(root).args([
                "build",
                "--release",
                "-q",
                "--manifest-path",
                "bench/peers/Cargo.toml",
            ]),
            "building the Rust peers",
        ),
        Need::Node => {
            let dir = root.join("bench/node");
            if dir.join("node_modules").exists() {
                return Ok(());
            }
            run(
                Command::new("npm")
                    .current_dir(&dir)
                    .args(["ci", "--no-audit", "--no-fund"]),
                "installing the Node peers",
            )
        }
        Need::Python => {
            let python = paths.venv_python();
            if !python.exists() {
                run(
                    Command::new("python3")
                        .arg("-m")
                        .arg("venv")
                        .arg(paths.out.join("venv")),
                    "creating the Python venv",
                )?;
            }
            run(
                Command::new(&python)
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "-q",
                        "--disable-pip-version-check",
                        "-r",
                    ])
                    .arg(root.join("bench/python/requirements.txt")),
                "installing the Python peer",
            )
        }
    }
}

/// Whether `path` looks like the repository root.
pub fn is_root(path: &Path) -> bool {
    path.join("crates/walkie-bench").is_dir()
}
