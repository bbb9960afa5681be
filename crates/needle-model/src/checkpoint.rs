//! Parameters on disk as safetensors: named little-endian f32 tensors, plus u32 side data.

use crate::neighbors::{ItemNeighbors, NeighborSpec};
use crate::tower::{tensors_mut, Tower};
use crate::ModelError;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::path::{Path, PathBuf};

fn bad(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.to_owned(), reason: reason.into() }
}

/// Writes every parameter of `model` (and its u32 side data) to `path`.
pub fn save<T: Tower>(model: &T, path: &Path) -> Result<(), ModelError> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = model
        .tensors()
        .into_iter()
        .map(|(name, shape, data)| (name, Dtype::F32, shape, data.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    for (name, data) in model.index_tensors() {
        owned.push((name, Dtype::U32, vec![data.len()], data.iter().flat_map(|x| x.to_le_bytes()).collect()));
    }
    write_tensors(&owned, path)
}

/// Writes the neighbour lists of an item-to-item model to `path`.
pub fn save_neighbors(model: &ItemNeighbors, path: &Path) -> Result<(), ModelError> {
    let (offsets, rows, weights) = model.parts();
    let owned = vec![
        ("offsets".to_owned(), Dtype::U64, vec![offsets.len()], offsets.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ("rows".to_owned(), Dtype::U32, vec![rows.len()], rows.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ("weights".to_owned(), Dtype::F32, vec![weights.len()], weights.iter().flat_map(|x| x.to_le_bytes()).collect()),
    ];
    write_tensors(&owned, path)
}

fn write_tensors(owned: &[(String, Dtype, Vec<usize>, Vec<u8>)], path: &Path) -> Result<(), ModelError> {
    let views = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, e.to_string()))?;
    // Write to a temporary name first so an interrupted save never leaves a torn checkpoint.
    let tmp = needle_core::file::tmp_path(path);
    safetensors::tensor::serialize_to_file(views, None, &tmp).map_err(|e| bad(path, e.to_string()))?;
    needle_core::file::persist(path).map_err(|e| ModelError::Io { path: path.to_owned(), source: e })
}

/// A checkpoint file read into memory.
pub struct Checkpoint {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Checkpoint {
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::Io { path: path.to_owned(), source: e })?;
        SafeTensors::deserialize(&bytes).map_err(|e| bad(path, e.to_string()))?;
        Ok(Checkpoint { path: path.to_owned(), bytes })
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated in read")
    }

    /// The bytes of a tensor by name, checked to have `dtype`.
    fn tensor_bytes(&self, name: &str, dtype: Dtype) -> Result<&[u8], ModelError> {
        let st = self.tensors();
        let t = st.tensor(name).map_err(|_| bad(&self.path, format!("missing tensor {name}")))?;
        if t.dtype() != dtype {
            return Err(bad(&self.path, format!("tensor {name} has dtype {:?}, expected {dtype:?}", t.dtype())));
        }
        Ok(t.data())
    }

    /// A u32 tensor by name.
    pub fn u32_tensor(&self, name: &str) -> Result<Vec<u32>, ModelError> {
        let b = self.tensor_bytes(name, Dtype::U32)?;
        Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// A u64 tensor by name.
    pub fn u64_tensor(&self, name: &str) -> Result<Vec<u64>, ModelError> {
        let b = self.tensor_bytes(name, Dtype::U64)?;
        Ok(b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
    }

    /// An f32 tensor by name.
    pub fn f32_tensor(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let b = self.tensor_bytes(name, Dtype::F32)?;
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Rebuilds an item-to-item model saved by [`save_neighbors`], with its spec and the training
    /// counts of its item rows.
    pub fn neighbors(&self, spec: NeighborSpec, counts: Vec<u64>) -> Result<ItemNeighbors, ModelError> {
        ItemNeighbors::from_parts(
            spec,
            self.u64_tensor("offsets")?,
            self.u32_tensor("rows")?,
            self.f32_tensor("weights")?,
            counts,
        )
        .map_err(|e| bad(&self.path, e))
    }

    /// Overwrites every parameter of `model` with the saved values, checking names and shapes.
    pub fn fill<T: Tower>(&self, model: &mut T) -> Result<(), ModelError> {
        let st = self.tensors();
        let names: Vec<(String, Vec<usize>)> = model.tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
        for ((name, shape), dst) in names.iter().zip(tensors_mut(model)) {
            let t = st.tensor(name).map_err(|_| bad(&self.path, format!("missing tensor {name}")))?;
            if t.dtype() != Dtype::F32 || t.shape() != shape.as_slice() {
                return Err(bad(
                    &self.path,
                    format!("tensor {name} is {:?}{:?}, the model config expects F32{:?}", t.dtype(), t.shape(), shape),
                ));
            }
            for (d, c) in dst.iter_mut().zip(t.data().chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deep::{CategoricalSpec, DeepSpec, DeepTwoTower, HistoryMode, ItemBags};

    #[test]
    fn round_trip_and_shape_mismatch_is_an_error() {
        let spec = DeepSpec {
            items: 5,
            dim: 4,
            max_seq_len: 3,
            history: HistoryMode::Own,
            user_features: vec![CategoricalSpec { name: "g".into(), rows: 3, dim: 2 }],
            item_features: vec![CategoricalSpec { name: "genres".into(), rows: 4, dim: 2 }],
            hidden: vec![8],
            item_hidden: Some(vec![6]),
            out_dim: 5,
            example_age: true,
            recent: 1,
            item_hash: None,
        };
        let bags = vec![ItemBags { offsets: vec![0, 0, 1, 3, 3, 4], keys: vec![1, 2, 3, 1] }];
        let model = DeepTwoTower::new(spec.clone(), bags.clone(), &mut crate::rng::Rng::new(9)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        save(&model, &path).unwrap();
        let ck = Checkpoint::read(&path).unwrap();
        assert_eq!(ck.u32_tensor("item_bags.genres.keys").unwrap(), bags[0].keys);
        let mut back = DeepTwoTower::new(spec.clone(), bags.clone(), &mut crate::rng::Rng::new(1)).unwrap();
        ck.fill(&mut back).unwrap();
        assert_eq!(back.item_emb.weights, model.item_emb.weights);
        assert_eq!(back.item_mlp.as_ref().unwrap().layers[1].w, model.item_mlp.as_ref().unwrap().layers[1].w);
        let mut wider = spec;
        wider.dim = 6;
        let mut other = DeepTwoTower::new(wider, bags, &mut crate::rng::Rng::new(1)).unwrap();
        let err = ck.fill(&mut other).unwrap_err().to_string();
        assert!(err.contains("item_emb"), "{err}");
        std::fs::write(&path, b"\x05\x00\x00").unwrap();
        assert!(Checkpoint::read(&path).is_err());
    }
}
