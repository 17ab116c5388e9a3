//! From a validation path (`flow[2].ports[0]`) to a line and column of the
//! TOML text, so that errors point at the offending line.

use toml_edit::{ImDocument, Item, Table, Value};

enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn key(&self, k: &str) -> Option<Node<'a>> {
        match self {
            Node::Table(t) => t.get(k).map(Node::Item),
            Node::Item(Item::Table(t)) => t.get(k).map(Node::Item),
            Node::Item(Item::Value(Value::InlineTable(t))) | Node::Value(Value::InlineTable(t)) => {
                t.get(k).map(Node::Value)
            }
            _ => None,
        }
    }

    fn index(&self, i: usize) -> Option<Node<'a>> {
        match self {
            Node::Item(Item::ArrayOfTables(a)) => a.get(i).map(Node::Table),
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => {
                a.get(i).map(Node::Value)
            }
            _ => None,
        }
    }

    fn span(&self) -> Option<std::ops::Range<usize>> {
        match self {
            Node::Item(i) => i.span(),
            Node::Table(t) => t.span(),
            Node::Value(v) => v.span(),
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Where `path` is in the TOML `text`: the deepest part of the path that
/// exists (a missing field points at its table). `None` if the text does not
/// parse or the path names nothing in it.
pub fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let doc = ImDocument::parse(text).ok()?;
    let mut node = Node::Table(doc.as_table());
    let mut best = None;
    for part in path.split('.') {
        let (key, indexes) = match part.find('[') {
            Some(b) => (&part[..b], &part[b..]),
            None => (part, ""),
        };
        node = match node.key(key) {
            Some(n) => n,
            None => break,
        };
        best = node.span().or(best);
        for idx in indexes.split('[').filter(|s| !s.is_empty()) {
            let Some(i) = idx.trim_end_matches(']').parse::<usize>().ok() else {
                return best.map(|s| line_col(text, s.start));
            };
            match node.index(i) {
                Some(n) => node = n,
                None => return best.map(|s| line_col(text, s.start)),
            }
            best = node.span().or(best);
        }
    }
    best.map(|s| line_col(text, s.start))
}
