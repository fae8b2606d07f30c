//! Byte offsets to `LINE:COLUMN`.

/// Byte offset to line and column, by binary search over the offsets at
/// which lines start: each position costs O(log lines), so a file with
/// 40,000 problems (or 8,000 rules, each with its header located) is not
/// rescanned from its start per position.
pub(super) struct LineIndex {
    /// Offset of the first byte of each line; `starts[0] == 0`.
    starts: Vec<usize>,
    len: usize,
}

impl LineIndex {
    pub(super) fn new(text: &str) -> LineIndex {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex {
            starts,
            len: text.len(),
        }
    }

    /// 1-based line and column (in bytes, as the offsets are) of `offset`.
    pub(super) fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.len);
        // The number of lines starting at or before `offset`; at least 1.
        let line = self.starts.partition_point(|&s| s <= offset);
        (line, offset - self.starts[line - 1] + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::LineIndex;

    #[test]
    fn lines_and_columns_count_from_one() {
        let lines = LineIndex::new("ab\n\ncd\n");
        assert_eq!(lines.line_col(0), (1, 1));
        assert_eq!(lines.line_col(1), (1, 2));
        assert_eq!(lines.line_col(2), (1, 3));
        assert_eq!(lines.line_col(3), (2, 1));
        assert_eq!(lines.line_col(4), (3, 1));
        assert_eq!(lines.line_col(6), (3, 3));
        // The end of the text, and past it, is the start of the last line.
        assert_eq!(lines.line_col(7), (4, 1));
        assert_eq!(lines.line_col(100), (4, 1));
        assert_eq!(LineIndex::new("").line_col(0), (1, 1));
    }
}
