/* The memory floor under the CPU backward's grad_x: how long writing 64 MiB by non-temporal stores
 * takes (what route_cpu_kernel.h's projection_backward_tile does for OLMoE's T = 8192, d = 2048 fp32
 * grad_x), next to reading 64 MiB and copying it with plain or non-temporal stores. Plain C with
 * AVX-512 and OpenMP, nothing of l2r_cuda:
 *
 *   gcc -O2 -mavx512f -fopenmp benchmarks/stream_bandwidth.c -o /tmp/stream_bandwidth
 *   OMP_NUM_THREADS=2 /tmp/stream_bandwidth
 *
 * Prints the load average, then per operation the best and median of 31 passes over the buffers
 * (warm: both buffers touched first, so no page faults are timed). */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

enum { kRead, kWriteStream, kCopyStream, kCopyPlain, kOps };
static const char* kNames[kOps] = {"read (sum)", "write, non-temporal", "copy, non-temporal stores",
                                   "copy, plain stores"};

int main(void) {
  const size_t bytes = (size_t)64 << 20, n = bytes / sizeof(float);
  float* a = aligned_alloc(2 << 20, bytes);
  float* b = aligned_alloc(2 << 20, bytes);
  if (!a || !b) return 1;
  memset(a, 0, bytes);
  for (size_t i = 0; i < n; ++i) b[i] = (float)(i & 1023);
  double load[3] = {0, 0, 0};
  FILE* f = fopen("/proc/loadavg", "r");
  if (f) {
    if (fscanf(f, "%lf %lf %lf", &load[0], &load[1], &load[2]) != 3) load[0] = -1;
    fclose(f);
  }
  printf("load average %.2f %.2f %.2f; 64 MiB per pass\n", load[0], load[1], load[2]);
  enum { kPasses = 31 };
  float sink = 0;
  for (int op = 0; op < kOps; ++op) {
    double t[kPasses];
    for (int p = 0; p < kPasses; ++p) {
      const double t0 = now();
      float total = 0;
#pragma omp parallel reduction(+ : total)
      {
        __m512 acc = _mm512_setzero_ps();
#pragma omp for schedule(static)
        for (size_t i = 0; i < n; i += 16) {
          switch (op) {
            case kRead: acc = _mm512_add_ps(acc, _mm512_load_ps(b + i)); break;
            case kWriteStream: _mm512_stream_ps(a + i, _mm512_set1_ps(1.0f)); break;
            case kCopyStream: _mm512_stream_ps(a + i, _mm512_load_ps(b + i)); break;
            default: _mm512_store_ps(a + i, _mm512_load_ps(b + i)); break;
          }
        }
        _mm_sfence();
        total += _mm512_reduce_add_ps(acc);
      }
      t[p] = now() - t0;
      sink += total;
    }
    qsort(t, kPasses, sizeof(double), by_value);
    printf("%-28s best %.2f ms, median %.2f ms (%.1f GB/s)\n", kNames[op], t[0] * 1e3, t[kPasses / 2] * 1e3,
           bytes / t[kPasses / 2] * 1e-9);
  }
  return sink == 12345.0f;  /* keeps the reads */
}
