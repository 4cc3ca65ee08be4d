//! What a bench run ran on: the commit, the CPU, the kernel and the versions of the parts
//! measured. Absolute figures move with all of these (the same commit measured 1.8x slower
//! per exchange on one machine than on another of the same kind), so each run records them
//! next to its figures, and prints them first.

use std::{path::Path, process::Command};

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Machine {
    /// `git rev-parse HEAD`, with `+dirty` when the tree has uncommitted changes.
    pub commit: Option<String>,
    /// The first `model name` of `/proc/cpuinfo`.
    pub cpu: Option<String>,
    /// Logical CPUs this process may run on.
    pub cores: usize,
    /// `/proc/sys/kernel/osrelease`.
    pub kernel: Option<String>,
    /// The release in `envoy --version` (`1.40.0`).
    pub envoy: Option<String>,
    /// `node --version` (the filter part's V8).
    pub node: Option<String>,
    /// `rustc --version`.
    pub rustc: Option<String>,
}

impl Machine {
    /// Reads what can be read; a part that cannot be asked says nothing (`None`) rather than
    /// stopping the run.
    pub fn read(envoy: Option<&Path>, node: Option<&Path>) -> Self {
        let commit = output("git", &["rev-parse", "HEAD"]).map(|head| {
            let dirty = output("git", &["status", "--porcelain"]).is_some_and(|status| !status.is_empty());
            if dirty {
                format!("{head}+dirty")
            } else {
                head
            }
        });
        Self {
            commit,
            cpu: std::fs::read_to_string("/proc/cpuinfo").ok().as_deref().and_then(cpu_model),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|k| k.trim().to_owned()),
            envoy: envoy.and_then(|e| output(e, &["--version"])).as_deref().and_then(envoy_release),
            node: node.and_then(|n| output(n, &["--version"])),
            rustc: output("rustc", &["--version"]),
        }
    }

    /// One line for the top of the bench's output.
    pub fn summary(&self) -> String {
        let or_unknown = |value: &Option<String>| value.clone().unwrap_or_else(|| "unknown".to_owned());
        let commit = self.commit.as_deref().map_or("unknown".to_owned(), |c| c.chars().take(12).collect());
        format!(
            "commit {commit}{} on {} ({} cores), kernel {}, Envoy {}, Node.js {}",
            if self.commit.as_deref().is_some_and(|c| c.ends_with("+dirty")) { "+dirty" } else { "" },
            or_unknown(&self.cpu),
            self.cores,
            or_unknown(&self.kernel),
            or_unknown(&self.envoy),
            or_unknown(&self.node),
        )
    }
}

/// A command's trimmed standard output, if it ran and succeeded.
fn output(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The first `model name` in the text of `/proc/cpuinfo`.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_owned()).filter(|v| !v.is_empty())
    })
}

/// The release in `envoy --version`'s output, which reads
/// `<path>  version: <sha>/<release>/<status>/<build type>/<ssl>`.
pub fn envoy_release(version_output: &str) -> Option<String> {
    let (_, version) = version_output.split_once("version: ")?;
    let release = version.split('/').nth(1)?.trim();
    (!release.is_empty()).then(|| release.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_model_is_the_first_model_name() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n\
                       flags\t\t: fpu\n\nprocessor\t: 1\nmodel name\t: Other\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC"));
        assert_eq!(cpu_model("processor\t: 0\nmodel\t\t: 1\n"), None);
        assert_eq!(cpu_model("model name\t:\n"), None);
    }

    #[test]
    fn envoy_release_is_the_second_field_of_the_version() {
        let output = "/x/envoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL";
        assert_eq!(envoy_release(output).as_deref(), Some("1.40.0"));
        assert_eq!(envoy_release("envoy: unknown option"), None);
        assert_eq!(envoy_release("version: abc"), None);
    }

    #[test]
    fn summary_names_a_dirty_tree_and_what_is_unknown() {
        let machine = Machine {
            commit: Some("0123456789abcdef0123+dirty".to_owned()),
            cpu: Some("AMD EPYC".to_owned()),
            cores: 2,
            kernel: None,
            envoy: Some("1.40.0".to_owned()),
            node: Some("v20.20.2".to_owned()),
            rustc: None,
        };
        assert_eq!(
            machine.summary(),
            "commit 0123456789ab+dirty on AMD EPYC (2 cores), kernel unknown, Envoy 1.40.0, Node.js v20.20.2"
        );
    }
}
