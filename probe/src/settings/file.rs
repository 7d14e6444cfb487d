//! `flowprobe run --config FILE`: the same settings as the flags, in TOML
//! (docs/run-and-backends.md, "Config file"). This reads the file as
//! written; the values are checked with the flags' in [`super`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `--backend` and the field `backend`: one enum for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Auto,
    Tc,
    Afpacket,
    Xdp,
}

/// The file as written; every field optional.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// As --iface, repeated.
    pub interfaces: Option<Vec<String>>,
    /// As --backend.
    pub backend: Option<Backend>,
    pub ebpf_object: Option<PathBuf>,
    /// As --state-dir.
    pub state_dir: Option<PathBuf>,
    /// As --per-interface.
    pub per_interface: Option<bool>,
    /// false: as --no-decap.
    pub decap: Option<bool>,
    /// As --vxlan-port.
    pub vxlan_port: Option<u16>,
    /// As --geneve-port.
    pub geneve_port: Option<u16>,
    pub max_conns: Option<u32>,
    pub closed_timeout: Option<f64>,
    pub idle_timeout: Option<f64>,
    /// As --keep-ended, --list-max and the --rollup-* flags.
    pub keep_ended: Option<f64>,
    pub list_max: Option<usize>,
    pub rollup_interval: Option<f64>,
    pub rollup_keep: Option<f64>,
    pub rollup_top: Option<usize>,
    pub interval: Option<f64>,
    /// As --listen.
    pub listen: Option<String>,
    /// As --metrics-labels.
    pub metrics_labels: Option<String>,
    pub export: Option<Export>,
    /// As --fleet and its flags.
    pub fleet: Option<Fleet>,
}

/// The `[fleet]` table.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// As --fleet: nats://HOST:PORT.
    pub url: Option<String>,
    pub host_id: Option<String>,
    pub network: Option<String>,
    pub interval: Option<f64>,
    pub top: Option<usize>,
    pub spool: Option<usize>,
    /// As --nats-user, --nats-password, --nats-token, --nats-creds,
    /// --nats-tls-ca.
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub creds: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// As --export-jsonl: a path, or "-" for stdout.
    pub jsonl: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("config {path}: {message}")]
pub struct ConfigError {
    path: String,
    message: String,
}

impl RunConfig {
    pub fn load(path: &Path) -> Result<RunConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        RunConfig::parse(&text).map_err(|message| ConfigError {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses the TOML: the error names the line and the field.
    pub fn parse(text: &str) -> Result<RunConfig, String> {
        toml::from_str(text).map_err(|e| toml_error(text, &e))
    }
}

/// One line: `line N: field `key`: message`.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_owned();
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    // The table the line is in, for nested keys like export.jsonl.
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    match line.split_once('=') {
        Some((key, _)) if !e.message().starts_with("unknown field") => {
            let key = key.trim();
            let key = match table {
                Some(t) => format!("{t}.{key}"),
                None => key.to_owned(),
            };
            format!("line {line_no}: field `{key}`: {}", e.message())
        }
        _ => format!("line {line_no}: {}", e.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file() {
        let c = RunConfig::parse(
            r#"
            interfaces = ["eth0", "lo"]
            backend = "tc"
            max_conns = 1024
            closed_timeout = 1.5
            idle_timeout = 60
            interval = 5
            listen = "127.0.0.1:9911"
            metrics_labels = "src.service,dst.service,dst.port"
            ebpf_object = "/tmp/probe-ebpf"

            [export]
            jsonl = "-"
            "#,
        )
        .unwrap();
        assert_eq!(c.interfaces.unwrap(), ["eth0", "lo"]);
        assert_eq!(c.max_conns, Some(1024));
        assert_eq!(c.idle_timeout, Some(60.0));
        assert_eq!(c.export.unwrap().jsonl.as_deref(), Some("-"));
    }

    #[test]
    fn empty_is_all_defaults() {
        assert_eq!(RunConfig::parse("").unwrap(), RunConfig::default());
    }

    #[test]
    fn errors_name_the_field() {
        for (text, want) in [
            (
                "max_conns = \"many\"",
                "line 1: field `max_conns`: invalid type: string \"many\", expected u32",
            ),
            ("max_conns = -1", "line 1: field `max_conns`: invalid value: integer `-1`, expected u32"),
            (
                "backend = \"pcap\"",
                "line 1: field `backend`: unknown variant `pcap`, expected one of `auto`, `tc`, `afpacket`, `xdp`",
            ),
            (
                "[export]\njsonl = 3",
                "line 2: field `export.jsonl`: invalid type: integer `3`, expected a string",
            ),
            (
                "interfaces = [\"eth0\"]\nmax_con = 5",
                "line 2: unknown field `max_con`, expected one of `interfaces`, `backend`, `ebpf_object`, `state_dir`, `per_interface`, `decap`, `vxlan_port`, `geneve_port`, `max_conns`, `closed_timeout`, `idle_timeout`, `keep_ended`, `list_max`, `rollup_interval`, `rollup_keep`, `rollup_top`, `interval`, `listen`, `metrics_labels`, `export`, `fleet`",
            ),
            (
                "[export]\nfile = \"x\"",
                "line 2: unknown field `file`, expected `jsonl`",
            ),
        ] {
            assert_eq!(RunConfig::parse(text).unwrap_err(), want, "{text}");
        }
    }
}
