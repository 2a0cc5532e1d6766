//! A fixed-size bitmap with one bit per guest RAM page (decoded-code pages,
//! dirty pages).

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
}

impl PageBitmap {
    pub fn new(pages: usize) -> PageBitmap {
        PageBitmap { words: vec![0; pages.div_ceil(64)] }
    }

    /// Pages beyond the end are ignored.
    pub fn set(&mut self, page: u64) {
        if let Some(w) = self.words.get_mut(page as usize / 64) {
            *w |= 1 << (page % 64);
        }
    }

    pub fn clear(&mut self, page: u64) {
        if let Some(w) = self.words.get_mut(page as usize / 64) {
            *w &= !(1 << (page % 64));
        }
    }

    pub fn get(&self, page: u64) -> bool {
        self.words.get(page as usize / 64).is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// The set pages in ascending order, clearing them.
    pub fn drain(&mut self) -> Vec<u64> {
        let mut pages = Vec::new();
        for (i, w) in self.words.iter_mut().enumerate() {
            let mut bits = std::mem::take(w);
            while bits != 0 {
                pages.push(i as u64 * 64 + bits.trailing_zeros() as u64);
                bits &= bits - 1;
            }
        }
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_drain_in_order() {
        let mut b = PageBitmap::new(200);
        for p in [130, 3, 64, 3, 199, 500] {
            b.set(p);
        }
        assert!(b.get(64) && !b.get(65) && !b.get(500));
        b.clear(64);
        assert_eq!(b.drain(), vec![3, 130, 199]);
        assert!(b.drain().is_empty());
    }
}
