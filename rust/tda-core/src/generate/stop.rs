//! Stop strings: find the first one in the generated text, and how much of the text's tail must be
//! held back from a stream because it could still grow into one.

pub struct StopStrings {
    stops: Vec<String>,
    longest: usize,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self { stops, longest }
    }

    /// Byte offset of the earliest stop string in `text` that ends after byte `new_from`
    /// (everything before that was already searched).
    pub fn find(&self, text: &str, new_from: usize) -> Option<usize> {
        let mut from = new_from.saturating_sub(self.longest.saturating_sub(1));
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        self.stops.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i)).min()
    }

    /// Bytes at the end of `text` that are a proper prefix of some stop string.
    pub fn holdback(&self, text: &str) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > best && text.ends_with(&s[..k]) {
                    best = k;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_earliest_and_holds_back_prefixes() {
        let s = StopStrings::new(vec!["END".into(), "\n\n".into(), "é!".into()]);
        assert_eq!(s.find("abc\n\nxEND", 0), Some(3));
        assert_eq!(s.find("abcEN", 0), None);
        assert_eq!(s.find("abcEND", 4), Some(3));
        assert_eq!(s.holdback("abcEN"), 2);
        assert_eq!(s.holdback("abc\n"), 1);
        assert_eq!(s.holdback("café"), "é".len());
        assert_eq!(s.holdback("abc"), 0);
        assert_eq!(StopStrings::new(vec![]).holdback("x"), 0);
    }
}
