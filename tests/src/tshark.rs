//! Reads pcap files with tshark, the judge of every file the project writes.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::tools;

/// One row per packet matching `filter`, one column per field. Multi-valued fields are
/// joined with `\u{1f}` (unit separator) so header values containing commas survive.
pub fn fields(pcap: &Path, filter: &str, fields: &[&str]) -> Result<Vec<Vec<String>>> {
    let mut command = Command::new(tools::tshark()?);
    command.args(["-r"]).arg(pcap).args(["-Y", filter, "-T", "fields", "-E", "separator=\u{1e}", "-E", "occurrence=a", "-E", "aggregator=\u{1f}"]);
    for field in fields {
        command.args(["-e", field]);
    }
    let output = command.output().with_context(|| format!("running tshark on {}", pcap.display()))?;
    if !output.status.success() {
        bail!("tshark failed on {}: {}", pcap.display(), String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.lines().map(|line| line.split('\u{1e}').map(str::to_owned).collect()).collect())
}

/// tshark's expert-info and malformed-packet complaints for a file (empty when clean).
pub fn problems(pcap: &Path) -> Result<Vec<String>> {
    let rows = fields(pcap, "_ws.malformed || _ws.expert.severity >= warning", &["frame.number", "_ws.expert.message"])?;
    Ok(rows.into_iter().map(|row| row.join(" ")).collect())
}
