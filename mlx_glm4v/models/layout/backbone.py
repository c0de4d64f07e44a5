"""HGNetV2, PP-DocLayoutV3's backbone, channels-last, with the convolution and batch-norm pieces
the rest of the detector shares."""

import mlx.core as mx
import mlx.nn as nn

from .config import BackboneConfig

ACTIVATIONS = {"relu": nn.relu, "silu": nn.silu, "gelu": nn.gelu, None: lambda x: x}


class BatchNorm(nn.Module):
    """A batch norm in inference: the running statistics, as torch's eval mode applies them."""

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((n,))
        self.bias = mx.zeros((n,))
        self.running_mean = mx.zeros((n,))
        self.running_var = mx.ones((n,))

    def __call__(self, x):
        scale = self.weight * mx.rsqrt(self.running_var + self.eps)
        return x * scale + (self.bias - self.running_mean * scale)


class ConvNorm(nn.Module):
    """Convolution without bias, batch norm, activation; `(k - 1) // 2` padding unless given."""

    def __init__(self, cin, cout, k, stride=1, groups=1, act="relu", eps=1e-5, padding=None):
        super().__init__()
        pad = (k - 1) // 2 if padding is None else padding
        self.convolution = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False)
        self.normalization = BatchNorm(cout, eps)
        self.act = ACTIVATIONS[act]

    def __call__(self, x):
        return self.act(self.normalization(self.convolution(x)))


class LearnableAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = mx.ones((1,))
        self.bias = mx.zeros((1,))

    def __call__(self, x):
        return self.scale * x + self.bias


class HGConv(ConvNorm):
    """HGNetV2's convolution layer: an optional learnable affine after the activation."""

    def __init__(self, cin, cout, k, stride=1, groups=1, act="relu", lab=False):
        super().__init__(cin, cout, k, stride, groups, act)
        if act and lab:
            self.lab = LearnableAffine()

    def __call__(self, x):
        x = super().__call__(x)
        return self.lab(x) if "lab" in self else x


class HGConvLight(nn.Module):
    def __init__(self, cin, cout, k, lab):
        super().__init__()
        self.conv1 = HGConv(cin, cout, 1, act=None, lab=lab)
        self.conv2 = HGConv(cout, cout, k, groups=cout, lab=lab)

    def __call__(self, x):
        return self.conv2(self.conv1(x))


def pad_bottom_right(x):
    return mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])


class Embeddings(nn.Module):
    def __init__(self, c: BackboneConfig):
        super().__init__()
        ch, s, act, lab = (
            c.stem_channels,
            c.stem_strides,
            c.hidden_act,
            c.use_learnable_affine_block,
        )
        self.stem1 = HGConv(ch[0], ch[1], 3, s[0], act=act, lab=lab)
        self.stem2a = HGConv(ch[1], ch[1] // 2, 2, s[1], act=act, lab=lab)
        self.stem2b = HGConv(ch[1] // 2, ch[1], 2, s[2], act=act, lab=lab)
        self.stem3 = HGConv(ch[1] * 2, ch[1], 3, s[3], act=act, lab=lab)
        self.stem4 = HGConv(ch[1], ch[2], 1, s[4], act=act, lab=lab)

    def __call__(self, x):
        x = pad_bottom_right(self.stem1(x))
        branch = self.stem2b(pad_bottom_right(self.stem2a(x)))
        # max pool, kernel 2, stride 1 (ceil mode adds nothing at stride 1)
        pooled = mx.maximum(
            mx.maximum(x[:, :-1, :-1], x[:, :-1, 1:]), mx.maximum(x[:, 1:, :-1], x[:, 1:, 1:])
        )
        return self.stem4(self.stem3(mx.concatenate([pooled, branch], axis=-1)))


class BasicLayer(nn.Module):
    def __init__(self, cin, mid, cout, n, k, residual, light, lab):
        super().__init__()
        self.residual = residual
        self.layers = [
            (
                HGConvLight(cin if i == 0 else mid, mid, k, lab)
                if light
                else HGConv(cin if i == 0 else mid, mid, k, lab=lab)
            )
            for i in range(n)
        ]
        total = cin + n * mid
        self.aggregation = [
            HGConv(total, cout // 2, 1, lab=lab),
            HGConv(cout // 2, cout, 1, lab=lab),
        ]

    def __call__(self, x):
        outputs = [x]
        h = x
        for layer in self.layers:
            h = layer(h)
            outputs.append(h)
        h = mx.concatenate(outputs, axis=-1)
        for conv in self.aggregation:
            h = conv(h)
        return h + x if self.residual else h


class Stage(nn.Module):
    def __init__(self, c: BackboneConfig, i: int):
        super().__init__()
        cin, mid, cout = c.stage_in_channels[i], c.stage_mid_channels[i], c.stage_out_channels[i]
        stride = c.stage_downsample_strides[i]
        stride = tuple(stride) if isinstance(stride, (list, tuple)) else stride
        if c.stage_downsample[i]:
            self.downsample = HGConv(cin, cin, 3, stride=stride, groups=cin, act=None)
        self.blocks = [
            BasicLayer(
                cin if b == 0 else cout,
                mid,
                cout,
                c.stage_numb_of_layers[i],
                c.stage_kernel_size[i],
                b != 0,
                c.stage_light_block[i],
                c.use_learnable_affine_block,
            )
            for b in range(c.stage_num_blocks[i])
        ]

    def __call__(self, x):
        if "downsample" in self:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: BackboneConfig):
        super().__init__()
        self.stages = [Stage(c, i) for i in range(len(c.stage_in_channels))]


class HGNetV2(nn.Module):
    """Returns the feature maps `out_features` names (`stem`, `stage1`, ...), channels-last."""

    def __init__(self, c: BackboneConfig):
        super().__init__()
        self.out_features = list(c.out_features)
        self.embedder = Embeddings(c)
        self.encoder = Encoder(c)

    @property
    def channels(self) -> list:
        return [
            s.blocks[-1].aggregation[-1].convolution.weight.shape[0] for s in self.encoder.stages
        ]

    def __call__(self, x) -> list:
        h = self.embedder(x)
        names = ["stem"] + [f"stage{i + 1}" for i in range(len(self.encoder.stages))]
        states = [h]
        for stage in self.encoder.stages:
            h = stage(h)
            states.append(h)
        return [s for name, s in zip(names, states) if name in self.out_features]


class ConvEncoder(nn.Module):
    """transformers' wrapper: the backbone is `backbone.model`."""

    def __init__(self, c: BackboneConfig):
        super().__init__()
        self.model = HGNetV2(c)

    def __call__(self, x):
        return self.model(x)
