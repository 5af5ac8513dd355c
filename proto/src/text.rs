//! Quoting what a peer sent in an error message or a log line, bounded: an error about a
//! malformed message must not carry the message itself, however long it is or however much its
//! escaped form grows (a control byte escapes to up to 8 bytes of `\u{..}`).

/// `text` with control characters, quotes and backslashes escaped as Rust's `{:?}` does, cut to
/// at most `max` bytes; a cut excerpt ends with `…` (at most `max + 3` bytes in all).
pub fn excerpt(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 3);
    for c in text.chars() {
        let escaped = c.escape_debug();
        let bytes: usize = escaped.clone().map(char::len_utf8).sum();
        if out.len() + bytes > max {
            out.push('…');
            break;
        }
        out.extend(escaped);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_excerpt_is_bounded_after_escaping() {
        assert_eq!(excerpt("short", 100), "short");
        assert_eq!(excerpt("a\nb", 100), "a\\nb");
        let control = "\u{10}".repeat(10_000);
        let cut = excerpt(&control, 200);
        assert!(cut.len() <= 203 && cut.ends_with('…'), "{} bytes", cut.len());
        assert!(cut.starts_with("\\u{10}"));
        let wide = "é".repeat(1000);
        assert!(excerpt(&wide, 201).len() <= 204);
    }
}
