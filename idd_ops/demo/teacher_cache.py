"""A frozen teacher's outputs on the training set, computed once and looked up by image index.

Every student run of the experiment asks the teacher the same questions: the teacher is frozen
in eval mode and the generated images are not augmented, so its logits and features for a
training image never change. Computing them once per experiment instead of once per step of
every configuration and seed takes the teacher's forward pass (about a third of a distillation
step here) out of the student runs; the values are the teacher's own.
"""
import torch
from torch import nn

from idd_ops.distiller import FeatureHook


class _Rows(nn.Module):
    """Returns rows of a table: stands where the teacher's feature layer was, so that a forward
    hook on that layer (as the Distiller sets) sees the cached features."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, index):
        return self.table[index]


class CachedTeacher(nn.Module):
    """Looks up ``teacher``'s logits and ``feature_layer`` outputs for the images of ``data``.

    Args:
        teacher: a model with ``feature_channels`` and a submodule named ``feature_layer``
            (``"head.bottleneck"``). data: a dataset with ``images [N, 3, H, W]`` uint8.
        feature_layer: dotted module name, e.g. ``"head.bottleneck"``. batch: images per forward
            pass while filling the cache. device: where the cache lives.

    Call :meth:`select` with the batch's image indices before each forward; the forward's
    ``images`` argument is then not read.
    """

    def __init__(self, teacher, data, feature_layer, batch, device):
        super().__init__()
        self.feature_channels = teacher.feature_channels
        hook = FeatureHook(teacher, feature_layer)
        logits, feats = [], []
        with torch.no_grad():
            for i in range(0, len(data), batch):
                logits.append(teacher(data.images[i:i + batch].to(device).float() / 255))
                feats.append(hook.pop())
        hook.remove()
        self.logits = torch.cat(logits)
        parent, _, leaf = feature_layer.rpartition(".")
        holder = self
        for name in parent.split(".") if parent else []:
            if not hasattr(holder, name):
                holder.add_module(name, nn.Module())
            holder = getattr(holder, name)
        holder.add_module(leaf, _Rows(torch.cat(feats)))
        self._feature = holder.get_submodule(leaf)
        self.index = None

    def select(self, index):
        self.index = index

    def forward(self, images):
        self._feature(self.index)  # the feature hook fires here
        return self.logits[self.index]
