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
    """Looks up a teacher's logits and ``feature_layer`` outputs by image index.

    Args:
        logits: ``[N, K, h, w]`` the teacher's logits of every image. features: ``[N, C, h, w]``
            its ``feature_layer`` outputs. feature_layer: dotted module name, e.g.
            ``"head.bottleneck"``.

    Build it with :meth:`compute`; :meth:`tables` and this constructor move it between processes.
    Call :meth:`select` with the batch's image indices before each forward; the forward's
    ``images`` argument is then not read.
    """

    def __init__(self, logits, features, feature_layer):
        super().__init__()
        self.feature_channels = features.shape[1]
        self.feature_layer = feature_layer
        self.logits = logits
        parent, _, leaf = feature_layer.rpartition(".")
        holder = self
        for name in parent.split(".") if parent else []:
            if not hasattr(holder, name):
                holder.add_module(name, nn.Module())
            holder = getattr(holder, name)
        holder.add_module(leaf, _Rows(features))
        self._feature = holder.get_submodule(leaf)
        self.index = None

    @classmethod
    def compute(cls, teacher, data, feature_layer, batch, device):
        """Runs ``teacher`` (a model with a submodule ``feature_layer``) over ``data.images
        [N, 3, H, W]`` uint8, ``batch`` images per forward pass; the tables live on ``device``."""
        hook = FeatureHook(teacher, feature_layer)
        logits, feats = [], []
        with torch.no_grad():
            for i in range(0, len(data), batch):
                logits.append(teacher(data.images[i:i + batch].to(device).float() / 255))
                feats.append(hook.pop())
        hook.remove()
        return cls(torch.cat(logits), torch.cat(feats), feature_layer)

    def tables(self):
        """(logits, features): the constructor's arguments."""
        return self.logits, self._feature.table

    def select(self, index):
        self.index = index

    def forward(self, images):
        self._feature(self.index)  # the feature hook fires here
        return self.logits[self.index]
