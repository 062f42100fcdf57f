//! One launcher for the proxy under test ([`Launch`]): the command line of `imds-proxy run`
//! against a simulated host, written once and used by the tests' support, the DaemonSet test (as
//! the container's arguments), `cargo xtask run`, the bench and the soak. It names the scene's
//! STS, its region and the role ARN prefix every scene's roles live under; each user adds its
//! own listen addresses, interface, ops listener, mode and extras.
use std::{ffi::OsStr, net::SocketAddr, path::Path, process::Command};

/// The prefix the scenes' container roles are created under (`--role-arn-prefix`).
pub const ROLE_ARN_PREFIX: &str = "arn:aws:iam::123456789012:role/containers/";

/// `imds-proxy run` and its flags, built up.
#[derive(Clone, Debug)]
pub struct Launch {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Default for Launch {
    fn default() -> Self {
        Self::new()
    }
}

impl Launch {
    /// `run --region us-east-1 --role-arn-prefix <the scenes'>`, logging warnings only.
    pub fn new() -> Self {
        Self {
            args: [
                "run",
                "--region",
                "us-east-1",
                "--role-arn-prefix",
                ROLE_ARN_PREFIX,
            ]
            .map(str::to_owned)
            .to_vec(),
            env: vec![("RUST_LOG".into(), "warn".into())],
        }
    }

    /// One flag and its value.
    pub fn flag(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        self.args.push(format!("--{name}"));
        self.args.push(value.to_string());
        self
    }

    /// `--listen` for each address (one IPv4, at most one IPv6).
    pub fn listen(self, addresses: &[&str]) -> Self {
        addresses
            .iter()
            .fold(self, |launch, address| launch.flag("listen", address))
    }

    /// `--ops-listen`: where readiness and metrics are read.
    pub fn ops(self, address: SocketAddr) -> Self {
        self.flag("ops-listen", address)
    }

    /// `--interface`: the listen addresses' own interface.
    pub fn interface(self, name: &str) -> Self {
        self.flag("interface", name)
    }

    /// `--sts-endpoint http://<address>`: the scene's STS (or a fault injector in front of it).
    pub fn sts(self, url: &str) -> Self {
        let url = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        self.flag("sts-endpoint", url)
    }

    /// More arguments, as given (a mode's, a test's).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// An environment variable for the proxy (`RUST_LOG` replaces the default).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Whether the arguments or the environment name STS already (a test's own endpoint, or
    /// the standard `AWS_ENDPOINT_URL_STS`).
    pub fn names_sts(&self) -> bool {
        self.args.iter().any(|a| a == "--sts-endpoint")
            || self.env.iter().any(|(k, _)| k == "AWS_ENDPOINT_URL_STS")
    }

    /// The arguments after the program's name (`run ...`).
    pub fn arguments(&self) -> &[String] {
        &self.args
    }

    /// The environment set for the proxy.
    pub fn environment(&self) -> &[(String, String)] {
        &self.env
    }

    /// The command running `program` (the proxy's binary) with these arguments and environment.
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        self.wrapped(&[program.as_ref().as_os_str()])
    }

    /// The command running `wrapper` (a program and its arguments, then the proxy's binary), as
    /// `strace -f`, `unshare ...` or `timeout` wrap it.
    pub fn wrapped(&self, wrapper: &[&OsStr]) -> Command {
        let (program, rest) = wrapper.split_first().expect("a program to run");
        let mut command = Command::new(program);
        command
            .args(rest)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_run_and_the_flags_in_order() {
        let launch = Launch::new()
            .listen(&["169.254.43.1:80", "[fd00:ec2:43::1]:80"])
            .sts("127.0.0.1:5555")
            .args(["--mode", "tc"])
            .env("RUST_LOG", "debug");
        assert_eq!(
            launch.arguments(),
            [
                "run",
                "--region",
                "us-east-1",
                "--role-arn-prefix",
                ROLE_ARN_PREFIX,
                "--listen",
                "169.254.43.1:80",
                "--listen",
                "[fd00:ec2:43::1]:80",
                "--sts-endpoint",
                "http://127.0.0.1:5555",
                "--mode",
                "tc"
            ]
        );
        assert!(launch.names_sts());
        assert_eq!(launch.environment(), [("RUST_LOG".into(), "debug".into())]);
        let command = launch.wrapped(&["timeout".as_ref(), "10".as_ref(), "proxy".as_ref()]);
        assert_eq!(command.get_program(), "timeout");
        assert_eq!(command.get_args().nth(1).unwrap(), "proxy");
        assert_eq!(command.get_args().nth(2).unwrap(), "run");
    }
}
