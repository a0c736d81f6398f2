//! A small HTML writer in which escaping is not a choice: markup can only be a `&'static str`
//! written in this crate, and every other string (a node name, a document's field, an error
//! text) goes through [`Html::text`] or [`Html::fmt`], which escape it.

use std::fmt::{self, Write};

/// An HTML document being written.
#[derive(Default)]
pub struct Html {
    out: String,
}

impl Html {
    pub fn with_capacity(n: usize) -> Self {
        Html { out: String::with_capacity(n) }
    }

    /// Markup from the program itself.
    pub fn raw(&mut self, markup: &'static str) -> &mut Self {
        self.out.push_str(markup);
        self
    }

    /// Text from anywhere, escaped for element content and quoted attribute values.
    pub fn text(&mut self, text: &str) -> &mut Self {
        escape_into(&mut self.out, text);
        self
    }

    /// Formatted text, escaped like [`Html::text`].
    pub fn fmt(&mut self, args: fmt::Arguments<'_>) -> &mut Self {
        let _ = Escaping(&mut self.out).write_fmt(args);
        self
    }

    /// `<tag>text</tag>` for a tag from the program.
    pub fn element(&mut self, open: &'static str, text: &str, close: &'static str) -> &mut Self {
        self.raw(open).text(text).raw(close)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

struct Escaping<'a>(&'a mut String);

impl Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

fn escape_into(out: &mut String, text: &str) {
    let mut rest = text;
    while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
        out.push_str(&rest[..i]);
        out.push_str(match rest.as_bytes()[i] {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            _ => "&#39;",
        });
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_markup_is_not() {
        let mut h = Html::default();
        h.raw("<td title=\"").text("a\"b").raw("\">").text("<script>alert('x')</script> & co").raw("</td>");
        h.fmt(format_args!("{}", "<img src=x onerror=alert(1)>"));
        assert_eq!(
            h.finish(),
            "<td title=\"a&quot;b\">&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co</td>\
             &lt;img src=x onerror=alert(1)&gt;"
        );
    }

    #[test]
    fn text_without_special_characters_is_copied_whole() {
        let mut h = Html::default();
        h.text("users.internal:8080 ✓");
        assert_eq!(h.finish(), "users.internal:8080 ✓");
    }
}
