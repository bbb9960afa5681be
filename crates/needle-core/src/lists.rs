//! Variable-length lists in one contiguous buffer.

/// Variable-length lists (one per user) stored as CSR.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lists {
    pub offsets: Vec<u32>,
    pub items: Vec<u32>,
}

impl Lists {
    pub fn new() -> Self {
        Lists { offsets: vec![0], items: Vec::new() }
    }

    /// Appends one list.
    pub fn push(&mut self, items: impl IntoIterator<Item = u32>) {
        self.items.extend(items);
        self.offsets.push(self.items.len() as u32);
    }

    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> &[u32] {
        &self.items[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}
