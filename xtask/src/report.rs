//! Writing results into `BENCHMARKS.md`: each task owns named blocks between HTML comment
//! markers and replaces only those, so hand-written analysis around them survives a rerun.

use std::{fs, path::Path};

use anyhow::{Context, Result};

/// Replaces the block `name` in the Markdown file at `path` with `body`, or, when the file
/// has no such block yet, puts it after the first line that starts with `after` (or at the
/// end). Creates the file, starting with `# Benchmarks`, when it does not exist.
pub fn write_block(path: &Path, name: &str, body: &str, after: &str) -> Result<()> {
    let doc = match fs::read_to_string(path) {
        Ok(doc) => doc,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n".to_owned(),
        Err(err) => return Err(err).with_context(|| format!("could not read {}", path.display())),
    };
    fs::write(path, replace_block(&doc, name, body, after))
        .with_context(|| format!("could not write {}", path.display()))
}

fn markers(name: &str) -> (String, String) {
    (
        format!("<!-- {name}: generated, do not edit by hand -->"),
        format!("<!-- /{name} -->"),
    )
}

fn replace_block(doc: &str, name: &str, body: &str, after: &str) -> String {
    let (begin, end) = markers(name);
    let block = format!("{begin}\n{}\n{end}", body.trim_end());
    if let (Some(start), Some(stop)) = (doc.find(&begin), doc.find(&end))
        && stop > start
    {
        return format!("{}{block}{}", &doc[..start], &doc[stop + end.len()..]);
    }
    let mut lines: Vec<&str> = doc.lines().collect();
    let at = lines
        .iter()
        .position(|line| line.starts_with(after))
        .map_or(lines.len(), |i| i + 1);
    lines.insert(at, "");
    lines.insert(at + 1, &block);
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// A duration in ms, in the unit a reader wants: `85 ms`, `2.31 s`, `64.0 s`.
pub fn ms(value: f64) -> String {
    if value.is_nan() {
        "–".to_owned()
    } else if value < 1000.0 {
        format!("{value:.0} ms")
    } else if value < 10_000.0 {
        format!("{:.2} s", value / 1000.0)
    } else {
        format!("{:.1} s", value / 1000.0)
    }
}

/// `1.23x`, or a dash.
pub fn ratio(value: Option<f64>) -> String {
    value.map_or("–".to_owned(), |r| format!("{r:.2}x"))
}

/// A signed percentage from a ratio: `+3.1 %`.
pub fn change(ratio: f64) -> String {
    format!("{:+.1} %", (ratio - 1.0) * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_inserted_once_and_then_replaced() {
        let doc = "# Benchmarks\n\n## Soak\n\nhand-written\n";
        let once = replace_block(doc, "soak", "first", "## Soak");
        assert!(once.contains("## Soak\n\n<!-- soak:"), "{once}");
        assert!(once.contains("first") && once.contains("hand-written"));
        let twice = replace_block(&once, "soak", "second", "## Soak");
        assert!(
            !twice.contains("first") && twice.contains("second"),
            "{twice}"
        );
        assert!(twice.contains("hand-written"));
        assert_eq!(twice.matches("<!-- soak:").count(), 1);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(ms(85.2), "85 ms");
        assert_eq!(ms(2310.0), "2.31 s");
        assert_eq!(ms(64_000.0), "64.0 s");
        assert_eq!(change(1.031), "+3.1 %");
    }
}
