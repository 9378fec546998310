//! The observer's image layout as the shipped Dockerfile's final stage declares it: where the
//! binary goes, which user runs it, its entrypoint. `cargo xtask image` builds the offline
//! image from these facts, and `tests/tests/container.rs` checks the built image against them,
//! so the Dockerfile stays the one description of the image.

use std::path::{Path, PathBuf};

/// The shipped Dockerfile, relative to the workspace root.
pub const DOCKERFILE: &str = "deploy/container/Dockerfile";
/// Where `cargo xtask image` leaves the image, relative to the target dir: a docker-archive
/// that `podman load`, `docker load` and `ctr images import` all read.
pub const IMAGE_ARCHIVE: &str = "image/containerd-observer.tar";
/// The image's name inside the archive (podman's `localhost/` for a locally built image).
pub const IMAGE_NAME: &str = "localhost/containerd-observer";

/// The image archive the container tests run: `$OBSERVER_IMAGE`, else
/// [`IMAGE_ARCHIVE`] under `$CARGO_TARGET_DIR` or the workspace's `target/`.
pub fn image_archive() -> PathBuf {
    match std::env::var_os("OBSERVER_IMAGE") {
        Some(path) => PathBuf::from(path),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")))
            .join(IMAGE_ARCHIVE),
    }
}

/// The final stage of the Dockerfile, reduced to what the running container sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayout {
    /// The final stage's base image, e.g. `debian:bookworm-slim`.
    pub base: String,
    /// Where the observer binary is copied to, e.g. `/usr/local/bin/observer`.
    pub binary: String,
    /// `USER`, e.g. `0`.
    pub user: String,
    /// `ENTRYPOINT`, in exec form.
    pub entrypoint: Vec<String>,
}

impl ImageLayout {
    /// Reads the Dockerfile at `path`.
    pub fn from_dockerfile(path: &Path) -> Result<ImageLayout, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        ImageLayout::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the final stage: its `FROM`, the one `COPY` of the binary, `USER` and an
    /// exec-form `ENTRYPOINT`. Anything else the final stage does is refused, since the
    /// offline image would not reproduce it.
    pub fn parse(text: &str) -> Result<ImageLayout, String> {
        let instructions = instructions(text);
        let last_from = instructions
            .iter()
            .rposition(|(word, _)| word == "FROM")
            .ok_or("no FROM instruction")?;
        let mut stage = instructions[last_from..].iter();
        let (_, from) = stage.next().ok_or("no FROM instruction")?;
        let base = from
            .split_whitespace()
            .next()
            .ok_or("FROM names no image")?
            .to_owned();
        let (mut binary, mut user, mut entrypoint) = (None, None, None);
        for (word, rest) in stage {
            match word.as_str() {
                "COPY" => {
                    let words: Vec<&str> = rest
                        .split_whitespace()
                        .filter(|w| !w.starts_with("--"))
                        .collect();
                    match words.as_slice() {
                        [_, dest] if binary.is_none() => binary = Some((*dest).to_owned()),
                        _ => return Err(format!("COPY {rest}: one COPY of one file expected")),
                    }
                }
                "USER" => user = Some(rest.trim().to_owned()),
                "ENTRYPOINT" => {
                    let exec: Vec<String> = serde_json::from_str(rest.trim()).map_err(|e| {
                        format!("ENTRYPOINT {rest}: use the exec form ([\"...\"]): {e}")
                    })?;
                    entrypoint = Some(exec);
                }
                other => {
                    return Err(format!(
                        "{other} {rest}: the final stage may only FROM, COPY, USER and ENTRYPOINT \
                         (teach `cargo xtask image` the new instruction first)"
                    ));
                }
            }
        }
        Ok(ImageLayout {
            base,
            binary: binary.ok_or("the final stage COPYs no binary")?,
            user: user.ok_or("the final stage sets no USER")?,
            entrypoint: entrypoint.ok_or("the final stage sets no ENTRYPOINT")?,
        })
    }

    /// The `--change` instructions for `podman import` that give an image this layout's config.
    pub fn import_changes(&self) -> Vec<String> {
        vec![
            format!("USER {}", self.user),
            format!(
                "ENTRYPOINT {}",
                serde_json::to_string(&self.entrypoint).unwrap_or_default()
            ),
        ]
    }
}

/// `(INSTRUCTION, arguments)` pairs, with comments dropped and continuation lines joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let line = std::mem::take(&mut current);
        if let Some((word, rest)) = line.split_once(char::is_whitespace) {
            out.push((word.to_ascii_uppercase(), rest.trim().to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_dockerfile_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(DOCKERFILE);
        let layout = ImageLayout::from_dockerfile(&path).unwrap();
        assert_eq!(layout.base, "debian:bookworm-slim");
        assert_eq!(layout.binary, "/usr/local/bin/observer");
        assert_eq!(layout.user, "0");
        assert_eq!(layout.entrypoint, ["/usr/local/bin/observer"]);
        assert_eq!(
            layout.import_changes(),
            ["USER 0", "ENTRYPOINT [\"/usr/local/bin/observer\"]"]
        );
    }

    #[test]
    fn a_final_stage_the_offline_build_cannot_reproduce_is_refused() {
        let err = ImageLayout::parse(
            "FROM a AS b\nRUN x \\\n  y\nFROM debian\nCOPY --from=b /o /bin/o\nENV A=1\n",
        )
        .unwrap_err();
        assert!(err.starts_with("ENV A=1"), "{err}");
        let err = ImageLayout::parse("FROM d\nCOPY x /o\nUSER 0\nENTRYPOINT /o\n").unwrap_err();
        assert!(err.contains("exec form"), "{err}");
    }
}
