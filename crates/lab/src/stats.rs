//! Figures from samples and from tools' output.

/// Median of a sample (NaN for none).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// The first number before `unit` in `text` (e.g. "3.95 k iops").
pub fn number_before(text: &str, unit: &str) -> Option<f64> {
    let i = text.find(unit)?;
    let words: Vec<&str> = text[..i].split_whitespace().collect();
    let (num, scale) = match words.last()? {
        &"k" => (words.get(words.len() - 2)?, 1e3),
        &"M" => (words.get(words.len() - 2)?, 1e6),
        w => (w, 1.0),
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

/// The number right after `prefix` in `text` (e.g. "paused it 7 ms" with
/// "paused it ").
pub fn number_after(text: &str, prefix: &str) -> Option<f64> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    rest.split(|c: char| !(c.is_ascii_digit() || c == '.')).next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_numbers() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert!(median(&mut []).is_nan());
        assert_eq!(number_before("read 3.95 k iops", "iops"), Some(3950.0));
        assert_eq!(number_before("12.5 MB/s", "MB/s"), Some(12.5));
        assert_eq!(number_before("no figure", "iops"), None);
        assert_eq!(number_after("the last paused it 7 ms (the first 61 ms)", "paused it "), Some(7.0));
        assert_eq!(number_after("nothing", "paused it "), None);
    }
}
