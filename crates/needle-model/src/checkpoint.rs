//! Parameters on disk as safetensors: named little-endian f32 (and u32 index) tensors.

use crate::youtubednn::{ItemBags, TowerSpec, YoutubeDnn};
use crate::ModelError;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes a YouTubeDNN model's parameters (and its item → feature bags) to `path`.
pub fn save_youtubednn(model: &YoutubeDnn, path: &Path) -> Result<(), ModelError> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = model
        .tensors()
        .into_iter()
        .map(|(name, shape, data)| (name, Dtype::F32, shape, f32_bytes(data)))
        .collect();
    if model.item_feat_emb.is_some() {
        let b = &model.item_bags;
        owned.push((
            "item_bags.offsets".into(),
            Dtype::U32,
            vec![b.offsets.len()],
            u32_bytes(&b.offsets),
        ));
        owned.push((
            "item_bags.keys".into(),
            Dtype::U32,
            vec![b.keys.len()],
            u32_bytes(&b.keys),
        ));
    }
    let views = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ModelError::Checkpoint {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    // Write to a temporary name first so an interrupted save never leaves a torn checkpoint.
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::tensor::serialize_to_file(views, None, &tmp).map_err(|e| {
        ModelError::Checkpoint {
            path: path.to_owned(),
            reason: e.to_string(),
        }
    })?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::Io {
        path: path.to_owned(),
        source: e,
    })
}

/// Reads a YouTubeDNN model saved by [`save_youtubednn`], checking every shape against `spec`.
pub fn load_youtubednn(spec: TowerSpec, path: &Path) -> Result<YoutubeDnn, ModelError> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::Io {
        path: path.to_owned(),
        source: e,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Checkpoint {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let tensors: HashMap<String, TensorView> = st.tensors().into_iter().collect();
    let bad = |reason: String| ModelError::Checkpoint {
        path: path.to_owned(),
        reason,
    };
    let get_u32 = |name: &str| -> Result<Vec<u32>, ModelError> {
        let t = tensors
            .get(name)
            .ok_or_else(|| bad(format!("missing tensor {name}")))?;
        if t.dtype() != Dtype::U32 {
            return Err(bad(format!(
                "tensor {name} has dtype {:?}, expected U32",
                t.dtype()
            )));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let item_bags = if spec.item_feature.is_some() {
        let bags = ItemBags {
            offsets: get_u32("item_bags.offsets")?,
            keys: get_u32("item_bags.keys")?,
        };
        let rows = spec.item_feature.as_ref().map_or(0, |f| f.rows) as u32;
        let sorted = bags.offsets.windows(2).all(|w| w[0] <= w[1]);
        if bags.offsets.len() != spec.items + 1
            || !sorted
            || bags.offsets.last().copied() != Some(bags.keys.len() as u32)
            || bags.keys.iter().any(|&k| k >= rows)
        {
            return Err(bad("item_bags tensors are inconsistent".into()));
        }
        bags
    } else {
        ItemBags::default()
    };
    let mut model = YoutubeDnn::new(spec, item_bags, &mut crate::rng::Rng::new(0));
    let names: Vec<(String, Vec<usize>)> = model
        .tensors()
        .into_iter()
        .map(|(n, s, _)| (n, s))
        .collect();
    for ((name, shape), dst) in names.iter().zip(model.tensors_mut()) {
        let t = tensors
            .get(name)
            .ok_or_else(|| bad(format!("missing tensor {name}")))?;
        if t.dtype() != Dtype::F32 || t.shape() != shape.as_slice() {
            return Err(bad(format!(
                "tensor {name} is {:?}{:?}, the model config expects F32{:?}",
                t.dtype(),
                t.shape(),
                shape
            )));
        }
        for (d, c) in dst.iter_mut().zip(t.data().chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::youtubednn::CategoricalSpec;

    #[test]
    fn round_trip_and_shape_mismatch_is_an_error() {
        let spec = TowerSpec {
            items: 5,
            dim: 4,
            max_seq_len: 3,
            user_features: vec![CategoricalSpec {
                name: "g".into(),
                rows: 3,
                dim: 2,
            }],
            item_feature: Some(CategoricalSpec {
                name: "genres".into(),
                rows: 4,
                dim: 2,
            }),
            hidden: vec![8],
            example_age: true,
        };
        let bags = ItemBags {
            offsets: vec![0, 0, 1, 3, 3, 4],
            keys: vec![1, 2, 3, 1],
        };
        let model = YoutubeDnn::new(spec.clone(), bags, &mut crate::rng::Rng::new(9));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        save_youtubednn(&model, &path).unwrap();
        let back = load_youtubednn(spec.clone(), &path).unwrap();
        assert_eq!(back.item_emb.weights, model.item_emb.weights);
        assert_eq!(back.layers[1].w, model.layers[1].w);
        assert_eq!(back.item_bags, model.item_bags);
        let mut wider = spec;
        wider.dim = 6;
        let err = load_youtubednn(wider, &path).unwrap_err().to_string();
        assert!(err.contains("item_emb"), "{err}");
        std::fs::write(&path, b"\x05\x00\x00").unwrap();
        assert!(load_youtubednn(back.spec.clone(), &path).is_err());
    }
}
