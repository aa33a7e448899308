"""Teacher and student segmentation networks: ResNet-style backbones at output stride 8 with a
PSP head (pyramid pooling), as in the paper's PSPNet-ResNet101 -> PSPNet-ResNet18 setting, sized
for CPU training. The head's bottleneck output ("head.bottleneck") is the feature map that IDD,
PID, SKD and IFVD read; the classifier maps it to logits at 1/8 of the input size."""
import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, dilation=1, padding_mode="zeros"):
        super().__init__()
        pad = dict(padding=dilation, dilation=dilation, bias=False, padding_mode=padding_mode)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, **pad)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, **pad)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Identity() if stride == 1 and cin == cout
                      else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class Backbone(nn.Module):
    """Stem (stride 2) and four stages of widths w, 2w, 4w, 8w; stages 2 and 3 halve the size,
    stage 4 is dilated, so the output stride is 8. padding_mode: of every 3x3 convolution; zero
    padding lets a network read its position off the image border, "reflect" hides most of it."""

    def __init__(self, width, blocks, padding_mode="zeros"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False, padding_mode=padding_mode),
                                  nn.BatchNorm2d(width), nn.ReLU())
        stages, cin = [], width
        for i, (n, stride, dilation) in enumerate(zip(blocks, (1, 2, 2, 1), (1, 1, 1, 2))):
            cout = width * 2 ** i
            stages.append(nn.Sequential(*[BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1, dilation, padding_mode)
                                          for j in range(n)]))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.out_channels = cin

    def forward(self, x):
        return self.stages(self.stem(x))


class PSPHead(nn.Module):
    """Pyramid pooling over bins (1, 2, 3, 6), concatenation, a 3x3 bottleneck (the distilled
    features), dropout and a 1x1 classifier."""

    def __init__(self, cin, channels, num_classes, bins=(1, 2, 3, 6), padding_mode="zeros"):
        super().__init__()
        branch = cin // len(bins)
        self.pools = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(cin, branch, 1, bias=False),
                                                 nn.BatchNorm2d(branch), nn.ReLU()) for b in bins)
        self.bottleneck = nn.Sequential(nn.Conv2d(cin + branch * len(bins), channels, 3, padding=1, bias=False,
                                                  padding_mode=padding_mode),
                                        nn.BatchNorm2d(channels), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x):
        size = x.shape[-2:]
        pyramid = [x] + [F.interpolate(p(x), size=size, mode="bilinear", align_corners=False) for p in self.pools]
        return self.classifier(self.bottleneck(torch.cat(pyramid, 1)))


class PSPNet(nn.Module):
    """Backbone + PSP head; forward(images [B,3,H,W]) -> logits [B, K, H/8, W/8]."""

    def __init__(self, num_classes, width, blocks, head_channels, padding_mode="zeros"):
        super().__init__()
        self.backbone = Backbone(width, blocks, padding_mode)
        self.head = PSPHead(self.backbone.out_channels, head_channels, num_classes, padding_mode=padding_mode)
        self.feature_channels = head_channels

    def forward(self, x):
        return self.head(self.backbone(x))


FEATURE_LAYER = "head.bottleneck"


def make_teacher(num_classes, width=32):
    """Wider and deeper: two blocks per stage, widths 32..256, head 128 channels by default."""
    return PSPNet(num_classes, width, (2, 2, 2, 2), head_channels=4 * width)


def make_student(num_classes, width=16, padding_mode="reflect"):
    """Thin: one block per stage, widths 16..128, head 64 channels by default, and reflect
    padding, so that it encodes position less well than the (zero-padded) teacher: the premise
    of position-information distillation, which the experiment's position probe checks."""
    return PSPNet(num_classes, width, (1, 1, 1, 1), head_channels=4 * width, padding_mode=padding_mode)
