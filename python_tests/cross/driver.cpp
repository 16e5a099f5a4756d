// Torch-free test driver for the CPU kernel cores (csrc/cpu/kernels.h), built by python_tests/test_cross_isa.py
// natively (x86-64: portable, AVX2 and, where the CPU has it, AVX-512 paths), natively with the AVX-512 sources
// compiled against SIMDe (-DCANDLE_EXT_SIMDE_AVX512: the AVX-512 path emulated, on any x86-64) and with the
// aarch64 cross compiler (run under qemu-aarch64: portable and NEON paths). The test writes the cases and their inputs; this program runs every case on every
// path it is asked for and writes the raw outputs; the test compares them with reference.py.
//
//   driver --best-isa                   print the best path of this build and CPU (isa.h)
//   driver --isas                       print every path this build and CPU run, comma-separated
//   driver --active-isa                 print the path the extension would take now (CANDLE_EXT_CPU_ISA
//                                       applied) and its line for `python -m candle_ext.info`
//   driver DIR ISA[,ISA...] [THREADS]   run DIR/cases.txt on each named path (avx512, avx2, neon, portable) with
//                                       THREADS threads (default 1), writing DIR/<id>.<isa>.out
//
// cases.txt, one case per line (all little-endian raw files in DIR, named <id>.<what>):
//   conv ID n h w words channels cout kh kw sh sw ph pw dh dw out_kind scale shift res_channels slope post_shift
//        nhwc res_pool packed pack_threshold
//        files: x (int32 [n,h,w,words]), w (int32 [cout,kh,kw,words]), and, when their flag is 1 (res_channels
//        > 0 for res), scale / shift / slope / post_shift / pack_threshold (float32 [cout]) and res (float32
//        [n,res_channels,ho,wo]; with nhwc [n,ho,wo,res_channels], or [n,2ho,2wo,res_channels] with res_pool);
//        out_kind 0 writes int32 [n,cout,ho,wo], 1 float32 [n,cout,ho,wo] (nhwc: [n,ho,wo,cout]), 2 (nhwc only)
//        no float output; with packed, the packed words [n,ho,wo,ceil(cout/32)] follow the float output
//   pack ID dtype n c h w nhwc bias
//        dtype f32|f16|bf16|f64; file x in NCHW (nhwc 0) or channels_last (nhwc 1) order; bias (float32, or
//        float64 for f64, [c], already rounded to x's dtype) when bias is 1; writes int32 [n,h,w,ceil(c/32)]
//   linear ID n in out bias
//        files x (float32 [n,in]), w (float32 [out,in]), bias (float32 [out]) when bias is 1; writes float32
//        [n,out] (each path sums in its own order: compared within rounding, not bit for bit)
//   stem ID n cin h w cout kh kw sh sw ph pw bias
//        files x (float32 [n,cin,h,w]), w (float32 [cout,cin,kh,kw]), alpha, beta, threshold (float32 [cout]),
//        bias (float32 [cout]) when bias is 1; writes float32 [n,ho,wo,cout] (compared within rounding), then the
//        packed words [n,ho,wo,ceil(cout/32)] of it against threshold (compared with the written values' signs)
//   maxpool ID planes h w kh kw sh sw ph pw dh dw ceil_mode
//        file x (float32 [planes,h,w]); writes float32 [planes,oh,ow] (compared bit for bit)
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cpu/kernels.h"

namespace {

int g_threads = 1;

std::vector<char> read_file(const std::string& path, size_t bytes) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw std::runtime_error("cannot open " + path);
  const size_t size = static_cast<size_t>(f.tellg());
  if (size != bytes) {
    throw std::runtime_error(path + " has " + std::to_string(size) + " bytes, expected " + std::to_string(bytes));
  }
  std::vector<char> data(bytes);
  f.seekg(0);
  f.read(data.data(), static_cast<std::streamsize>(bytes));
  return data;
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!f) throw std::runtime_error("cannot write " + path);
}

candle::cpu::Isa parse_isa(const std::string& name) {
  using candle::cpu::Isa;
  for (Isa isa : candle::cpu::kIsas) {
    if (name != candle::cpu::isa_name(isa)) continue;
    // Only the paths this build has and this CPU runs (AVX-512 anywhere in the SIMDe build).
    if (!candle::cpu::isa_available(isa)) {
      throw std::runtime_error(name + " is not available here (best path: " +
                               candle::cpu::isa_name(candle::cpu::best_isa()) + ")");
    }
    return isa;
  }
  throw std::runtime_error("unknown path " + name);
}

// An output buffer filled with a poison pattern, with kGuard poisoned words on either side: an output the kernel
// does not write keeps the pattern (and fails the comparison), a write outside the output is reported.
constexpr size_t kGuard = 64;
constexpr uint32_t kPoison = 0xa5a5a5a5u;

struct Output {
  std::vector<uint32_t> words;
  explicit Output(size_t count) : words(count + 2 * kGuard, kPoison) {}
  void* data() { return words.data() + kGuard; }
  void write(const std::string& path) {
    for (size_t i = 0; i < kGuard; ++i) {
      if (words[i] != kPoison || words[words.size() - 1 - i] != kPoison) {
        throw std::runtime_error("the kernel wrote outside its output for " + path);
      }
    }
    write_file(path, data(), 4 * (words.size() - 2 * kGuard));
  }
};

template <typename T>
std::vector<T> as(const std::vector<char>& bytes) {
  std::vector<T> v(bytes.size() / sizeof(T));
  std::memcpy(v.data(), bytes.data(), bytes.size());
  return v;
}

void run_conv(std::istringstream& in, const std::string& dir, const std::string& id,
              const std::vector<candle::cpu::Isa>& isas) {
  candle::cpu::ConvGeometry g{};
  int64_t channels, out_kind, has_scale, has_shift, res_channels, has_slope, has_post, nhwc, res_pool, packed, has_thr;
  in >> g.n >> g.h >> g.w >> g.words >> channels >> g.cout >> g.kh >> g.kw >> g.sh >> g.sw >> g.ph >> g.pw >> g.dh >>
      g.dw >> out_kind >> has_scale >> has_shift >> res_channels >> has_slope >> has_post >> nhwc >> res_pool >> packed >>
      has_thr;
  if (!in) throw std::runtime_error("bad conv line for " + id);
  const int64_t span_h = g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1, span_w = g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1;
  if (span_h < 0 || span_w < 0 || g.sh < 1 || g.sw < 1 || channels > 32 * g.words || channels <= 32 * (g.words - 1)) {
    throw std::runtime_error("bad conv geometry for " + id);
  }
  g.ho = span_h / g.sh + 1;
  g.wo = span_w / g.sw + 1;
  const std::string base = dir + "/" + id + ".";
  const auto x = as<uint32_t>(read_file(base + "x", 4 * g.n * g.h * g.w * g.words));
  const auto w = as<uint32_t>(read_file(base + "w", 4 * g.cout * g.kh * g.kw * g.words));
  const size_t vec = 4 * static_cast<size_t>(g.cout);
  auto optional = [&](bool present, const char* what, size_t bytes) {
    return present ? as<float>(read_file(base + what, bytes)) : std::vector<float>();
  };
  const std::vector<float> scale = optional(has_scale, "scale", vec), shift = optional(has_shift, "shift", vec);
  const std::vector<float> slope = optional(has_slope, "slope", vec);
  const std::vector<float> post_shift = optional(has_post, "post_shift", vec);
  const std::vector<float> threshold = optional(has_thr, "pack_threshold", vec);
  const int64_t pool = res_pool ? 4 : 1;
  const std::vector<float> res = optional(res_channels > 0, "res", 4 * g.n * res_channels * g.ho * g.wo * pool);
  if ((out_kind == 2 && !packed) || ((packed || res_pool) && !nhwc) || (nhwc && out_kind == 0)) {
    throw std::runtime_error("bad output flags for " + id);
  }
  candle::cpu::Post post;
  post.residual = res_channels ? res.data() : nullptr;
  post.res_channels = res_channels;
  post.slope = has_slope ? slope.data() : nullptr;
  post.post_shift = has_post ? post_shift.data() : nullptr;
  post.nhwc = nhwc != 0;
  post.res_pool = res_pool != 0;
  post.pack_threshold = has_thr ? threshold.data() : nullptr;
  const size_t count = out_kind == 2 ? 0 : static_cast<size_t>(g.n * g.cout * g.ho * g.wo);
  const size_t words = packed ? static_cast<size_t>(g.n * g.ho * g.wo * ((g.cout + 31) / 32)) : 0;
  for (candle::cpu::Isa isa : isas) {
    Output out(count + words);
    post.packed = packed ? static_cast<uint32_t*>(out.data()) + count : nullptr;
    candle::cpu::binary_conv2d(isa, g, channels, x.data(), w.data(), has_scale ? scale.data() : nullptr,
                               has_shift ? shift.data() : nullptr,
                               out_kind == 0 ? static_cast<int32_t*>(out.data()) : nullptr,
                               out_kind == 1 ? static_cast<float*>(out.data()) : nullptr, post);
    out.write(base + candle::cpu::isa_name(isa) + ".out");
  }
}

void run_pack(std::istringstream& in, const std::string& dir, const std::string& id,
              const std::vector<candle::cpu::Isa>& isas) {
  std::string dtype_name;
  int64_t n, c, h, w, nhwc, has_bias;
  in >> dtype_name >> n >> c >> h >> w >> nhwc >> has_bias;
  if (!in) throw std::runtime_error("bad pack line for " + id);
  using candle::cpu::DType;
  DType dtype;
  size_t elem;
  if (dtype_name == "f32") {
    dtype = DType::Float32, elem = 4;
  } else if (dtype_name == "f16") {
    dtype = DType::Float16, elem = 2;
  } else if (dtype_name == "bf16") {
    dtype = DType::BFloat16, elem = 2;
  } else if (dtype_name == "f64") {
    dtype = DType::Float64, elem = 8;
  } else {
    throw std::runtime_error("bad dtype " + dtype_name);
  }
  const std::string base = dir + "/" + id + ".";
  const auto x = read_file(base + "x", elem * n * c * h * w);
  const size_t bias_elem = dtype == DType::Float64 ? 8 : 4;
  const auto bias = has_bias ? read_file(base + "bias", bias_elem * c) : std::vector<char>();
  const int64_t words = (c + 31) / 32;
  candle::cpu::PackJob j{};
  j.n = n, j.c = c, j.h = h, j.w = w, j.words = words;
  if (nhwc) {
    j.sn = h * w * c, j.sc = 1, j.sh = w * c, j.sw = c;
  } else {
    j.sn = c * h * w, j.sc = h * w, j.sh = w, j.sw = 1;
  }
  j.x = x.data();
  j.dtype = dtype;
  j.bias_f = has_bias && dtype != DType::Float64 ? reinterpret_cast<const float*>(bias.data()) : nullptr;
  j.bias_d = has_bias && dtype == DType::Float64 ? reinterpret_cast<const double*>(bias.data()) : nullptr;
  for (candle::cpu::Isa isa : isas) {
    Output out(static_cast<size_t>(n * h * w * words));
    j.out = static_cast<uint32_t*>(out.data());
    candle::cpu::sign_pack(isa, j, nhwc != 0);
    out.write(base + candle::cpu::isa_name(isa) + ".out");
  }
}

void run_linear(std::istringstream& in, const std::string& dir, const std::string& id,
                const std::vector<candle::cpu::Isa>& isas) {
  int64_t n, fin, fout, has_bias;
  in >> n >> fin >> fout >> has_bias;
  if (!in) throw std::runtime_error("bad linear line for " + id);
  const std::string base = dir + "/" + id + ".";
  const auto x = as<float>(read_file(base + "x", 4 * n * fin));
  const auto w = as<float>(read_file(base + "w", 4 * fout * fin));
  const auto b = has_bias ? as<float>(read_file(base + "bias", 4 * fout)) : std::vector<float>();
  for (candle::cpu::Isa isa : isas) {
    Output out(static_cast<size_t>(n * fout));
    candle::cpu::LinearJob j{n, fin, fout, x.data(), w.data(), has_bias ? b.data() : nullptr,
                             static_cast<float*>(out.data())};
    candle::cpu::linear(isa, j);
    out.write(base + candle::cpu::isa_name(isa) + ".out");
  }
}

void run_stem(std::istringstream& in, const std::string& dir, const std::string& id,
              const std::vector<candle::cpu::Isa>& isas) {
  int64_t n, cin, h, w, cout, kh, kw, sh, sw, ph, pw, has_bias;
  in >> n >> cin >> h >> w >> cout >> kh >> kw >> sh >> sw >> ph >> pw >> has_bias;
  if (!in) throw std::runtime_error("bad stem line for " + id);
  const std::string base = dir + "/" + id + ".";
  const auto x = as<float>(read_file(base + "x", 4 * n * cin * h * w));
  const auto wt = as<float>(read_file(base + "w", 4 * cout * cin * kh * kw));
  const auto alpha = as<float>(read_file(base + "alpha", 4 * cout));
  const auto beta = as<float>(read_file(base + "beta", 4 * cout));
  const auto threshold = as<float>(read_file(base + "threshold", 4 * cout));
  const auto b = has_bias ? as<float>(read_file(base + "bias", 4 * cout)) : std::vector<float>();
  const int64_t ho = (h + 2 * ph - kh) / sh + 1, wo = (w + 2 * pw - kw) / sw + 1, words = (cout + 31) / 32;
  for (candle::cpu::Isa isa : isas) {
    Output out(static_cast<size_t>(n * ho * wo * (cout + words)));
    float* values = static_cast<float*>(out.data());
    candle::cpu::StemJob j{n, cin, h, w, cout, kh, kw, sh, sw, ph, pw, ho, wo, x.data(), wt.data(),
                           has_bias ? b.data() : nullptr, alpha.data(), beta.data(), threshold.data(), values,
                           reinterpret_cast<uint32_t*>(values + n * ho * wo * cout)};
    candle::cpu::stem_conv(isa, j);
    out.write(base + candle::cpu::isa_name(isa) + ".out");
  }
}

void run_maxpool(std::istringstream& in, const std::string& dir, const std::string& id,
                 const std::vector<candle::cpu::Isa>& isas) {
  candle::cpu::MaxPoolJob j{};
  int64_t ceil_mode;
  in >> j.planes >> j.h >> j.w >> j.kh >> j.kw >> j.sh >> j.sw >> j.ph >> j.pw >> j.dh >> j.dw >> ceil_mode;
  if (!in) throw std::runtime_error("bad maxpool line for " + id);
  j.oh = candle::cpu::max_pool_output_size(j.h, j.kh, j.ph, j.sh, j.dh, ceil_mode != 0);
  j.ow = candle::cpu::max_pool_output_size(j.w, j.kw, j.pw, j.sw, j.dw, ceil_mode != 0);
  if (j.oh < 1 || j.ow < 1) throw std::runtime_error("bad maxpool geometry for " + id);
  const std::string base = dir + "/" + id + ".";
  const auto x = as<float>(read_file(base + "x", 4 * j.planes * j.h * j.w));
  j.x = x.data();
  for (candle::cpu::Isa isa : isas) {
    Output out(static_cast<size_t>(j.planes * j.oh * j.ow));
    j.y = static_cast<float*>(out.data());
    candle::cpu::max_pool2d(isa, j);
    out.write(base + candle::cpu::isa_name(isa) + ".out");
  }
}

}  // namespace

namespace candle {
namespace cpu {

// Like at::parallel_for: [begin, end) in at most g_threads chunks of >= grain, each on its own thread.
void parallel_for_impl(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  const int64_t range = end - begin;
  int64_t chunks = std::min<int64_t>(g_threads, (range + grain - 1) / std::max<int64_t>(grain, 1));
  if (chunks <= 1) {
    f(begin, end);
    return;
  }
  const int64_t size = (range + chunks - 1) / chunks;
  std::vector<std::thread> pool;
  for (int64_t b = begin + size; b < end; b += size) pool.emplace_back(f, b, std::min(end, b + size));
  f(begin, std::min(end, begin + size));
  for (std::thread& t : pool) t.join();
}

int64_t parallel_threads() { return g_threads; }

}  // namespace cpu
}  // namespace candle

int main(int argc, char** argv) {
  try {
    if (argc == 2 && std::string(argv[1]) == "--best-isa") {
      std::printf("%s\n", candle::cpu::isa_name(candle::cpu::best_isa()));
      return 0;
    }
    if (argc == 2 && std::string(argv[1]) == "--isas") {
      std::string names;
      for (candle::cpu::Isa isa : candle::cpu::kIsas) {
        if (!candle::cpu::isa_available(isa)) continue;
        if (!names.empty()) names += ',';
        names += candle::cpu::isa_name(isa);
      }
      std::printf("%s\n", names.c_str());
      return 0;
    }
    if (argc == 2 && std::string(argv[1]) == "--active-isa") {
      candle::cpu::Isa isa;
      std::string error;
      if (!candle::cpu::choose_isa(isa, error)) throw std::runtime_error(error);
      std::printf("%s\n%s\n", candle::cpu::isa_name(isa), candle::cpu::isa_description().c_str());
      return 0;
    }
    if (argc < 3 || argc > 4) {
      std::fprintf(stderr, "usage: %s --best-isa | --isas | --active-isa | DIR ISA[,ISA...] [THREADS]\n", argv[0]);
      return 2;
    }
    const std::string dir = argv[1];
    std::vector<candle::cpu::Isa> isas;
    std::stringstream names(argv[2]);
    for (std::string name; std::getline(names, name, ',');) isas.push_back(parse_isa(name));
    if (argc == 4) g_threads = std::max(1, std::atoi(argv[3]));
    std::ifstream cases(dir + "/cases.txt");
    if (!cases) throw std::runtime_error("cannot open " + dir + "/cases.txt");
    int done = 0;
    for (std::string line; std::getline(cases, line);) {
      if (line.empty()) continue;
      std::istringstream in(line);
      std::string kind, id;
      in >> kind >> id;
      if (kind == "conv") {
        run_conv(in, dir, id, isas);
      } else if (kind == "pack") {
        run_pack(in, dir, id, isas);
      } else if (kind == "linear") {
        run_linear(in, dir, id, isas);
      } else if (kind == "stem") {
        run_stem(in, dir, id, isas);
      } else if (kind == "maxpool") {
        run_maxpool(in, dir, id, isas);
      } else {
        throw std::runtime_error("unknown case kind " + kind);
      }
      ++done;
    }
    std::printf("%d cases on %s, %d threads\n", done, argv[2], g_threads);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "driver: %s\n", e.what());
    return 1;
  }
}
