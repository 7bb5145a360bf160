/*
 * The colour augmentation of the pretraining views on a CPU, fused per view (stellar_hf.data.ViewAugmentation).
 *
 * The eager torch path makes some forty passes over each view's pixels, one per tensor operation. Here a view's
 * jitter, grayscale and clamp are one pass over its pixels (plus one before each contrast, which needs the mean of
 * the view as it stands then), in tiles that stay in the L1 cache, and its blur is two passes (across, then down).
 *
 * Each operation follows torchvision.transforms.v2.functional on float32 tensors step by step (adjust_brightness,
 * adjust_contrast, adjust_saturation, adjust_hue through HSV, rgb_to_grayscale, gaussian_blur as two 1-D passes over
 * reflect padding), so a view matches the per-view reference (stellar_hf.data.MultiViewTransform) to float32
 * rounding. torch fuses `a.add_(b, alpha=w)` into one multiply-add on CPUs that have the instruction; so does this
 * file there (MULTIPLY_ADD), and nowhere else: it is built without -ffast-math and with contraction off, so every
 * other rounding is the one the source writes. The blur's 9 x 9 convolution in torchvision sums in another order
 * than the two 1-D passes here: that, and torch.mean's summation order, are the float rounding left (2e-6 at most,
 * tested). Plain C99 with no torch headers, so it compiles in well under a second (stellar_hf/native.py builds it on
 * first use and calls it through ctypes).
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Pixels per tile of the jitter pass: three channels of it, 6 KiB, stay in L1 through every operation. */
#define TILE 512

enum { BRIGHTNESS = 0, CONTRAST = 1, SATURATION = 2, HUE = 3 };

static inline float clamp01(float value) { return value < 0.0f ? 0.0f : (value > 1.0f ? 1.0f : value); }

/* a + b * w as torch's add_(b, alpha=w): one rounding where the CPU has fused multiply-adds, as torch's kernels. */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define MULTIPLY_ADD(a, b, w) fmaf((b), (w), (a))
#else
#define MULTIPLY_ADD(a, b, w) ((a) + (b) * (w))
#endif

/* rgb_to_grayscale: r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114). */
static inline float luma(float red, float green, float blue) {
    return MULTIPLY_ADD(MULTIPLY_ADD(red * 0.2989f, green, 0.587f), blue, 0.114f);
}

/* adjust_brightness: image.mul(ratio).clamp_(0, 1). */
static void brighten(float *restrict plane, int64_t count, float ratio) {
    for (int64_t i = 0; i < count; i++) plane[i] = clamp01(plane[i] * ratio);
}

/* _blend(image, other, ratio) = image.mul(ratio).add_(other, alpha=rest).clamp_(0, 1), rest = 1 - ratio, for a
 * constant other (adjust_contrast's mean). */
static void blend_constant(float *restrict plane, int64_t count, float ratio, float other, float rest) {
    for (int64_t i = 0; i < count; i++) plane[i] = clamp01(MULTIPLY_ADD(plane[i] * ratio, other, rest));
}

/* adjust_saturation: _blend with the view's own luma. */
static void saturate(float *restrict red, float *restrict green, float *restrict blue, int64_t count, float ratio,
                     float rest) {
    for (int64_t i = 0; i < count; i++) {
        float gray = luma(red[i], green[i], blue[i]);
        red[i] = clamp01(MULTIPLY_ADD(red[i] * ratio, gray, rest));
        green[i] = clamp01(MULTIPLY_ADD(green[i] * ratio, gray, rest));
        blue[i] = clamp01(MULTIPLY_ADD(blue[i] * ratio, gray, rest));
    }
}

/* rgb_to_grayscale to three channels, then the clamp the reference applies after grayscale. */
static void grayscale(float *restrict red, float *restrict green, float *restrict blue, int64_t count) {
    for (int64_t i = 0; i < count; i++) {
        float gray = clamp01(luma(red[i], green[i], blue[i]));
        red[i] = gray;
        green[i] = gray;
        blue[i] = gray;
    }
}

static void clamp_planes(float *restrict red, float *restrict green, float *restrict blue, int64_t count) {
    for (int64_t i = 0; i < count; i++) {
        red[i] = clamp01(red[i]);
        green[i] = clamp01(green[i]);
        blue[i] = clamp01(blue[i]);
    }
}

/* floorf for |x| < 2^31, written so that compilers vectorise it without SSE4.1's round instruction. */
static inline float floor_of(float x) {
    float truncated = (float)(int32_t)x;
    return truncated > x ? truncated - 1.0f : truncated;
}

static inline float pick(int condition, float yes, float no) { return condition ? yes : no; }

/* adjust_hue: _rgb_to_hsv, (h + shift) % 1, _hsv_to_rgb, operation for operation. The reference multiplies by its
 * masks (adding exact zeros); selects give the same values. Every branch is computed and picked, branch-free, so
 * the loop vectorises. */
static void rotate_hue(float *restrict red, float *restrict green, float *restrict blue, int64_t count, float shift) {
    for (int64_t i = 0; i < count; i++) {
        float r = red[i], g = green[i], b = blue[i];
        float maxc = r > g ? r : g;
        maxc = maxc > b ? maxc : b;
        float minc = r < g ? r : g;
        minc = minc < b ? minc : b;
        float range = maxc - minc;
        int grey = maxc == minc, red_max = maxc == r, green_max = maxc == g;
        float saturation = range / pick(grey, 1.0f, maxc);
        float divisor = pick(grey, 1.0f, range);
        float rc = (maxc - r) / divisor, gc = (maxc - g) / divisor, bc = (maxc - b) / divisor;
        float hr = pick(red_max, bc - gc, 0.0f);
        float hg = pick((!red_max) & green_max, (rc + 2.0f) - bc, 0.0f);
        float hb = pick((!red_max) & (!green_max), (gc + 4.0f) - rc, 0.0f);
        float hue = (hr + hg) + hb;
        hue = hue * (1.0f / 6.0f) + 1.0f;
        hue = hue - floor_of(hue); /* fmod(hue, 1) for hue >= 0, exactly */
        hue = hue + shift;
        hue = hue - floor_of(hue); /* remainder(hue, 1), exactly */
        float h6 = hue * 6.0f;
        float sextant = floor_of(h6);
        float fraction = h6 - sextant;
        sextant = pick(sextant >= 6.0f, sextant - 6.0f, sextant);
        float sxf = saturation * fraction, one_minus_s = 1.0f - saturation;
        float q = clamp01((1.0f - sxf) * maxc);
        float t = clamp01((sxf + one_minus_s) * maxc);
        float p = clamp01(one_minus_s * maxc);
        float v = maxc;
        /* By sextant 0..5, (r, g, b) = (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q). */
        float later = pick(sextant < 4.0f, p, pick(sextant < 5.0f, t, v));
        red[i] = pick(sextant < 1.0f, v, pick(sextant < 2.0f, q, later));
        green[i] = pick(sextant < 1.0f, t, pick(sextant < 3.0f, v, pick(sextant < 4.0f, q, p)));
        blue[i] = pick(sextant < 2.0f, p, pick(sextant < 3.0f, t, pick(sextant < 5.0f, v, q)));
    }
}

/* The jitter steps of one view from operation `first` (inclusive) to `last` (exclusive) on one tile, the contrast
 * at `first` (if any) taking `mean`. */
static void jitter_tile(float *restrict red, float *restrict green, float *restrict blue, int64_t count,
                        const int32_t *operations, const float *factors, int first, int last, float mean) {
    for (int position = first; position < last; position++) {
        float factor = factors[position];
        switch (operations[position]) {
            case BRIGHTNESS:
                brighten(red, count, factor);
                brighten(green, count, factor);
                brighten(blue, count, factor);
                break;
            case CONTRAST: {
                float rest = (float)(1.0 - (double)factor);
                blend_constant(red, count, factor, mean, rest);
                blend_constant(green, count, factor, mean, rest);
                blend_constant(blue, count, factor, mean, rest);
                break;
            }
            case SATURATION:
                saturate(red, green, blue, count, factor, (float)(1.0 - (double)factor));
                break;
            case HUE:
                rotate_hue(red, green, blue, count, factor);
                break;
            default:
                break;
        }
    }
}

/* Reflect an index into [0, size) as torch's "reflect" padding (the edge not repeated); needs size > distance. */
static inline int64_t reflect(int64_t index, int64_t size) {
    return index < 0 ? -index : (index >= size ? 2 * (size - 1) - index : index);
}

/* One plane blurred across into `out` (both height x width): out = taps[0] x + sum_d taps[d] (x[-d] + x[+d]),
 * each shifted term added in turn as the eager path adds them. */
static void blur_across(const float *restrict plane, float *restrict out, int64_t height, int64_t width,
                        const float *taps, int radius) {
    for (int64_t y = 0; y < height; y++) {
        const float *row = plane + y * width;
        float *result = out + y * width;
        for (int64_t x = 0; x < width; x++) result[x] = row[x] * taps[0];
        for (int d = 1; d <= radius; d++) {
            float tap = taps[d];
            for (int64_t x = 0; x < d; x++) result[x] += row[reflect(x - d, width)] * tap;
            for (int64_t x = d; x < width; x++) result[x] += row[x - d] * tap;
            for (int64_t x = 0; x < width - d; x++) result[x] += row[x + d] * tap;
            for (int64_t x = width - d; x < width; x++) result[x] += row[reflect(x + d, width)] * tap;
        }
    }
}

/* One plane blurred down from `plane` into `out`, row by row. */
static void blur_down(const float *restrict plane, float *restrict out, int64_t height, int64_t width,
                      const float *taps, int radius) {
    for (int64_t y = 0; y < height; y++) {
        float *result = out + y * width;
        const float *row = plane + y * width;
        for (int64_t x = 0; x < width; x++) result[x] = row[x] * taps[0];
        for (int d = 1; d <= radius; d++) {
            float tap = taps[d];
            const float *above = plane + reflect(y - d, height) * width;
            const float *below = plane + reflect(y + d, height) * width;
            for (int64_t x = 0; x < width; x++) result[x] += above[x] * tap;
            for (int64_t x = 0; x < width; x++) result[x] += below[x] * tap;
        }
    }
}

/* The sum of a tile's luma (float within the tile, double across tiles: the mean of a large view stays exact to
 * float32 rounding, as torch.mean's cascade sum keeps it). */
static double tile_luma_sum(const float *red, const float *green, const float *blue, int64_t count) {
    float sum = 0.0f;
    for (int64_t i = 0; i < count; i++) sum += luma(red[i], green[i], blue[i]);
    return sum;
}

/* The mean luma of one (3, pixels) view, for a contrast at the first position. */
static float mean_luma(const float *view, int64_t pixels) {
    double sum = 0.0;
    for (int64_t start = 0; start < pixels; start += TILE) {
        int64_t size = pixels - start < TILE ? pixels - start : TILE;
        sum += tile_luma_sum(view + start, view + pixels + start, view + 2 * pixels + start, size);
    }
    return (float)(sum / (double)pixels);
}

/*
 * Colour `count` views, each (3, height, width) float32 contiguous, from `views` into `out` (which may be `views`).
 *
 * Per view v:
 *   operations[4 v + k]  the jitter operation at position k (0 brightness, 1 contrast, 2 saturation, 3 hue; -1 none)
 *   factors[4 v + k]     its factor (the hue's shift in turns)
 *   gray[v]              1: grayscale after the jitter
 *   blur_radius[v]       taps per side of its blur (-1: not blurred); < width and < height
 *   taps[v * taps_stride + d]  the weight at distance d, d = 0 .. blur_radius[v]
 * `scratch`: height * width floats, for the blur.
 */
void stellar_color_views(const float *views, float *out, int64_t count, int64_t height, int64_t width,
                         const int32_t *operations, const float *factors, const int32_t *gray,
                         const int32_t *blur_radius, const float *taps, int64_t taps_stride, float *scratch) {
    int64_t pixels = height * width;
    for (int64_t v = 0; v < count; v++) {
        const float *source = views + v * 3 * pixels;
        float *target = out + v * 3 * pixels;
        const int32_t *view_operations = operations + 4 * v;
        const float *view_factors = factors + 4 * v;
        /* One pass per stretch of the jitter that starts at a contrast or at position 0: a contrast needs the
         * mean luma of the view as it stands, which the pass before it sums (or a read of the input, at 0). */
        float mean = view_operations[0] == CONTRAST ? mean_luma(source, pixels) : 0.0f;
        for (int first = 0, last; first < 4; first = last) {
            last = first + 1;
            while (last < 4 && view_operations[last] != CONTRAST) last++;
            double luma_sum = 0.0;
            for (int64_t start = 0; start < pixels; start += TILE) {
                int64_t size = pixels - start < TILE ? pixels - start : TILE;
                float *red = target + start, *green = target + pixels + start, *blue = target + 2 * pixels + start;
                if (source != target) {
                    memcpy(red, source + start, size * sizeof(float));
                    memcpy(green, source + pixels + start, size * sizeof(float));
                    memcpy(blue, source + 2 * pixels + start, size * sizeof(float));
                }
                jitter_tile(red, green, blue, size, view_operations, view_factors, first, last, mean);
                if (last == 4) {
                    if (gray[v]) grayscale(red, green, blue, size);
                    else clamp_planes(red, green, blue, size);
                } else {
                    luma_sum += tile_luma_sum(red, green, blue, size);
                }
            }
            source = target;
            mean = (float)(luma_sum / (double)pixels);
        }
        int radius = blur_radius[v];
        if (radius < 0) continue;
        const float *view_taps = taps + v * taps_stride;
        /* A grayscale view's three planes are equal: one is blurred, and copied. */
        for (int channel = 0; channel < (gray[v] ? 1 : 3); channel++) {
            float *plane = target + channel * pixels;
            blur_across(plane, scratch, height, width, view_taps, radius);
            blur_down(scratch, plane, height, width, view_taps, radius);
        }
        if (gray[v]) {
            memcpy(target + pixels, target, pixels * sizeof(float));
            memcpy(target + 2 * pixels, target, pixels * sizeof(float));
        }
    }
}
