//! Prompt lookup ("n-gram") drafting: the tokens that followed the latest earlier occurrence of
//! the sequence's last few tokens. Free to compute, no second model; it pays where the output
//! repeats its input (code edits, quotes, summaries that cite, structured data).

/// Longest suffix looked up; longer matches are tried first (a longer match predicts better).
pub const MAX_NGRAM: usize = 4;
/// Shortest suffix looked up: one token matches too often by chance to be worth a verification.
pub const MIN_NGRAM: usize = 2;
/// How far back a match is searched, in tokens, so a proposal costs microseconds at any length.
const SEARCH_WINDOW: usize = 16_384;

/// A continuation proposed from the sequence itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Proposal {
    pub tokens: Vec<u32>,
    /// Length of the suffix that matched (how much evidence the proposal rests on).
    pub matched: usize,
}

/// Up to `max` tokens that followed the most recent earlier occurrence of `history`'s last
/// `MAX_NGRAM` (down to `MIN_NGRAM`) tokens; empty when none occurs.
pub fn propose(history: &[u32], max: usize) -> Proposal {
    if max == 0 {
        return Proposal::default();
    }
    let len = history.len();
    let lo = len.saturating_sub(SEARCH_WINDOW);
    for n in (MIN_NGRAM..=MAX_NGRAM.min(len.saturating_sub(1))).rev() {
        let suffix = &history[len - n..];
        // Latest start `s` of an earlier occurrence (it must end before the suffix itself starts,
        // so that at least one token follows it).
        let found = (lo..len - n).rev().find(|&s| &history[s..s + n] == suffix);
        if let Some(s) = found {
            // The copy goes on past the end of the history into the proposal itself, so a
            // repeating pattern (a rule of `=`, a loop) proposes `max` tokens, not one period.
            let mut tokens = Vec::with_capacity(max);
            for i in s + n..s + n + max {
                let t = if i < len { history[i] } else { tokens[i - len] };
                tokens.push(t);
            }
            return Proposal { tokens, matched: n };
        }
    }
    Proposal::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposes_what_followed_the_latest_match() {
        // "1 2 3 4 5 … 1 2 3" → "4 5"; the later of two occurrences wins.
        let h = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 0, 2, 3];
        let p = propose(&h, 3);
        assert_eq!(p, Proposal { tokens: vec![7, 8, 0], matched: 2 });
        let h = [1, 2, 3, 4, 5, 6, 1, 2, 3];
        assert_eq!(propose(&h, 2), Proposal { tokens: vec![4, 5], matched: 3 });
        assert_eq!(propose(&h, 10).tokens, vec![4, 5, 6, 1, 2, 3, 4, 5, 6, 1]);
    }

    #[test]
    fn longer_matches_first_and_nothing_without_one() {
        // The 2-token suffix "5 6" occurs at 0 and 4; the 3-token "4 5 6" only at 3.
        let h = [5, 6, 1, 4, 5, 6, 2, 9, 4, 5, 6];
        let p = propose(&h, 1);
        assert_eq!(p, Proposal { tokens: vec![2], matched: 3 });
        assert!(propose(&[1, 2, 3, 4], 4).tokens.is_empty());
        assert!(propose(&[1, 1], 4).tokens.is_empty(), "a single repeated token is below MIN_NGRAM");
        assert!(propose(&[], 4).tokens.is_empty());
        assert!(propose(&h, 0).tokens.is_empty());
    }

    #[test]
    fn a_repeating_pattern_continues_past_the_end() {
        let h = [7u32; 10];
        assert_eq!(propose(&h, 3), Proposal { tokens: vec![7, 7, 7], matched: 4 });
        let h = [1, 2, 1, 2, 1];
        assert_eq!(propose(&h, 4).tokens, vec![2, 1, 2, 1]);
    }
}
