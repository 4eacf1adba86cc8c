"""The FID Inception: TF's 2015-12-05 Inception v3 as ported by pytorch-fid 0.3.0
(pt_inception-2015-12-05-6726825d.pth). Module names equal the keys of that file, so it loads strictly.

    load_fid_inception(path, flag='--inception') -> FIDInception with the file's weights, eval mode
    FIDInception()(x): (B,3,H,W) in [0,1] -> (B,2048) pool3 features
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.state_dict import load_strict, read_state_dict

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_HELP = (f"{INCEPTION_FILE}: get it from the 'fid_weights' release of mseitzer/pytorch-fid on GitHub "
                  f"(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}), or leave "
                  "--inception out to have it downloaded once into the torch hub cache")


class Conv(nn.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TensorFlow's 3x3 average pool leaves the zero padding out of the average.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(tf_avg_pool(x))], 1)


class MixedB(nn.Module):  # grid reduction 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class MixedC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, **row)
        self.branch7x7_3 = Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **row), Conv(c7, c7, **col)
        self.branch7x7dbl_5 = Conv(c7, 192, **row)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(b)),
                          self.branch_pool(tf_avg_pool(x))], 1)


class MixedD(nn.Module):  # grid reduction 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), self.branch7x7x3_4(b),
                          F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.max_pool = max_pool  # the last block of the FID Inception max-pools (a quirk of the TF graph)
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, **row), Conv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, **row), Conv(384, 384, **col)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """(B,3,H,W) in [0,1] -> (B,2048) pool3 features."""

    tag, toy = "inception", False  # load_feature_net adds the weight file's digest to the tag

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = MixedA(192, 32), MixedA(256, 64), MixedA(288, 64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b, self.Mixed_6c = MixedC(768, 128), MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = MixedC(768, 160), MixedC(768, 192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b, self.Mixed_7c = MixedE(1280, max_pool=False), MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # unused; present so that the official file loads strictly

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):  # resize and scale in fp32 even under autocast
            x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.float().mean((2, 3))


def load_fid_inception(path, flag="--inception"):
    """The FID Inception with the weights of `path` (the pytorch-fid file), in eval mode on the CPU.

    Files without BatchNorm's num_batches_tracked counters load too. Every failure is one DataError line."""
    sd = read_state_dict(path, flag, f"the FID Inception weights ({INCEPTION_FILE})", fix=f"FID needs {INCEPTION_HELP}")
    net = FIDInception()
    load_strict(net, sd, f"{flag} {path}", "the FID Inception weights", optional=("num_batches_tracked",),
                hint=f"expected {INCEPTION_FILE}")  # files without BatchNorm's counters keep the module's
    return net.eval()
