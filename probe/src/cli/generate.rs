//! Shell completions (`clap_complete`) and man pages (`clap_mangen`) from
//! the clap definition, so that they never disagree with `--help`. Hidden
//! commands are left out of both.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Command, CommandFactory};
use clap_complete::Shell;

use super::Cli;

/// The command line as a user sees it: without the hidden commands, which
/// clap_complete would offer otherwise.
fn public() -> Command {
    let cli = Cli::command();
    let mut cmd = Command::new(cli.get_name().to_owned())
        .subcommands(visible(&cli).cloned())
        .subcommand_required(cli.is_subcommand_required_set());
    if let Some(v) = cli.get_version() {
        cmd = cmd.version(v.to_owned());
    }
    if let Some(a) = cli.get_about() {
        cmd = cmd.about(a.clone());
    }
    cmd
}

/// The completion script for `shell`.
pub fn completions(shell: Shell, out: &mut dyn Write) -> io::Result<()> {
    let mut cmd = public();
    let name = cmd.get_name().to_owned();
    // clap_complete panics on a write error (a closed pipe): write it here.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    out.write_all(&script)
}

/// flowprobe(1), which lists the commands as flowprobe-NAME(1).
pub fn man(out: &mut dyn Write) -> io::Result<()> {
    clap_mangen::Man::new(public()).render(out)
}

/// flowprobe.1 and flowprobe-NAME.1 for every command, written into `dir`;
/// the paths written.
pub fn man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = public();
    cmd.build();
    let mut pages = vec![(cmd.get_name().to_owned(), cmd.clone())];
    for sub in visible(&cmd) {
        let name = format!("{}-{}", cmd.get_name(), sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    let mut written = Vec::new();
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(page).render(&mut buf)?;
        fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The commands a user sees (not `help`, not the hidden ones).
fn visible(cmd: &Command) -> impl Iterator<Item = &Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        let cmd = public();
        visible(&cmd).map(|s| s.get_name().to_owned()).collect()
    }

    #[test]
    fn the_man_page_lists_every_command() {
        let mut buf = Vec::new();
        man(&mut buf).unwrap();
        let page = String::from_utf8(buf).unwrap();
        assert!(
            page.starts_with(".ie") || page.contains(".TH flowprobe 1"),
            "{page}"
        );
        let cmds = names();
        assert_eq!(cmds, ["replay", "run", "fleet", "query", "top"]);
        for c in &cmds {
            // roff escapes the dash: flowprobe\-run(1).
            assert!(
                page.contains(&format!("flowprobe\\-{c}(1)")),
                "{c} missing:\n{page}"
            );
        }
        assert!(!page.contains("completions"), "a hidden command is listed");
    }

    #[test]
    fn every_command_has_a_page_with_its_flags() {
        let dir = tempfile::tempdir().unwrap();
        let written = man_pages(dir.path()).unwrap();
        let files: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            files,
            [
                "flowprobe.1",
                "flowprobe-replay.1",
                "flowprobe-run.1",
                "flowprobe-fleet.1",
                "flowprobe-query.1",
                "flowprobe-top.1"
            ]
        );
        let run = fs::read_to_string(dir.path().join("flowprobe-run.1")).unwrap();
        for flag in [
            "backend",
            "listen",
            "config",
            "metrics\\-labels",
            "export\\-jsonl",
            "fleet",
            "host\\-id",
        ] {
            assert!(run.contains(&format!("\\-\\-{flag}")), "--{flag} missing");
        }
    }

    #[test]
    fn completions_know_the_commands_and_flags() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut buf = Vec::new();
            completions(shell, &mut buf).unwrap();
            let script = String::from_utf8(buf).unwrap();
            for word in [
                "replay",
                "run",
                "query",
                "top",
                "--replay",
                "--listen",
                "--backend",
                "afpacket",
            ] {
                assert!(script.contains(word), "{shell}: no {word}");
            }
            assert!(!script.contains("completions"), "{shell}: a hidden command");
        }
    }
}
