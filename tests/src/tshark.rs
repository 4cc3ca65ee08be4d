//! Reads pcap files with tshark, the judge of every file the project writes.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::tools;

/// One row per packet matching `filter`, one column per field. Multi-valued fields are
/// joined with `\u{1f}` (unit separator) so header values containing commas survive.
/// tshark's JSON output is used because it escapes what fields contain (bodies with newlines).
pub fn fields(pcap: &Path, filter: &str, fields: &[&str]) -> Result<Vec<Vec<String>>> {
    read_filtered(pcap, None, filter, fields)
}

/// As [`fields`], with a "decode as" rule such as `tcp.port==50051,http2` (tshark's `-d`; see
/// [`decode_rule`]).
pub fn fields_decoded(pcap: &Path, decode_as: &str, filter: &str, fields: &[&str]) -> Result<Vec<Vec<String>>> {
    read_filtered(pcap, Some(decode_as), filter, fields)
}

/// As [`fields`], with an optional "decode as" rule.
pub fn read_filtered(pcap: &Path, decode_as: Option<&str>, filter: &str, fields: &[&str]) -> Result<Vec<Vec<String>>> {
    let mut command = Command::new(tools::tshark()?);
    command.arg("-r").arg(pcap);
    if let Some(rule) = decode_as {
        command.args(["-d", rule]);
    }
    command.args(["-Y", filter, "-T", "json"]);
    for field in fields {
        command.args(["-e", field]);
    }
    let output = command.output().with_context(|| format!("running tshark on {}", pcap.display()))?;
    if !output.status.success() {
        bail!("tshark failed on {}: {}", pcap.display(), String::from_utf8_lossy(&output.stderr));
    }
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let packets: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("tshark JSON for {}: {}", pcap.display(), String::from_utf8_lossy(&output.stderr)))?;
    let packets = packets.as_array().context("tshark JSON is not an array")?;
    Ok(packets
        .iter()
        .map(|packet| {
            let layers = &packet["_source"]["layers"];
            fields
                .iter()
                .map(|field| match &layers[*field] {
                    serde_json::Value::Array(values) => values
                        .iter()
                        .map(|v| v.as_str().unwrap_or_default().to_owned())
                        .collect::<Vec<_>>()
                        .join("\u{1f}"),
                    serde_json::Value::String(value) => value.clone(),
                    _ => String::new(),
                })
                .collect()
        })
        .collect())
}

/// The "decode as" rule that opens a capture as `protocol` (`http`, `http2`), derived from the
/// file the way the README tells users to: `protocol` on the conversation's server port, the
/// destination port of its first packet (the SYN).
///
/// Wireshark picks a TCP dissector by port before trying heuristics, so HTTP/2 (which has no
/// heuristic) needs the rule always, and HTTP/1.1 whenever a port of the conversation is one
/// Wireshark assigns to another protocol (34980, a client port like any other, is EtherCAT's).
pub fn decode_rule(pcap: &Path, protocol: &str) -> Result<String> {
    let rows = read_filtered(pcap, None, "frame.number == 1", &["tcp.dstport"])?;
    let port = rows.first().and_then(|row| row.first()).filter(|p| !p.is_empty()).context("no first packet")?;
    Ok(format!("tcp.port=={port},{protocol}"))
}

/// tshark's malformed-packet and expert warnings/errors for a file (empty when clean).
pub fn problems(pcap: &Path) -> Result<Vec<String>> {
    problems_decoded(pcap, None)
}

/// As [`problems`], with an optional "decode as" rule.
pub fn problems_decoded(pcap: &Path, decode_as: Option<&str>) -> Result<Vec<String>> {
    let filter = "_ws.malformed || _ws.expert.severity >= 6291456";
    let rows = read_filtered(pcap, decode_as, filter, &["frame.number", "_ws.expert.message"])?;
    Ok(rows.into_iter().map(|row| row.join(" ")).collect())
}
