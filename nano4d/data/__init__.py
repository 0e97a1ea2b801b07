"""nano4d's data: procedural data rendered on the CPU (deterministic by seed, no download) and readers for
the real formats the papers train on. Import the modules directly; this package re-exports nothing.

    common      DataError, splits and seeds, thread limits, compositing, value noise, JSON field reading
    objects     procedural SDF objects and ``ProceduralObjects`` (GeoLRM / MuM default data)
    driving     procedural street scenes and ``ProceduralDriving`` (MIM4D default data)
    gobjaverse  the GObjaverse object layout: reader, writer, ``GObjaverseDataset``, occupancy from depth
    sequences   ``ImageSequenceFolder``: folders of unposed image sequences (MuM)
    rig         nuScenes-style rig JSON (``RigDataset``) and LiDAR -> per-camera depth maps
    nuscenes    nuScenes read from its own schema (``NuScenesDataset``) and ``write_nuscenes``
    sampling    ``ResumableSampler`` / ``DynamicBatchSampler`` (sharded, epoch-seeded, resumable) and ``Stream``
    meshes      textured OBJ collections rendered into the GObjaverse layout (``python -m nano4d.data.meshes``)
    preview     preview PNGs of the procedural data (``python -m nano4d.data.preview``)
    bench       items/s of one worker per dataset (``python -m nano4d.data.bench``)

Imports point one way: common <- gobjaverse, sequences, rig, nuscenes, sampling <- objects, driving <- preview
<- meshes, bench (plus ``nano4d.cameras`` for every camera); nothing here imports the training helpers or the
models. Every dataset holds only an index and reads (or renders) an item in ``__getitem__``.
"""
