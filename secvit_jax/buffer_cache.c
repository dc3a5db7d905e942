// A cache of large allocations, preloaded (LD_PRELOAD) into the CPU commands by host_memory.py.
//
// Why: XLA's CPU runtime allocates each execution's temporary buffer as one block (999.5 MB for a
// secvit_t train step at batch 8, 224²) and frees it when the execution ends. glibc serves a block
// that large with a fresh mmap and unmaps it on free, so every step the kernel maps and zeroes a
// gigabyte again: 7.7% of the CPU samples of a secvit_t step in clear_page, and 0.2-0.3 s of
// system time per step. glibc cannot be told to keep it (its mmap threshold stops at 32 MiB;
// mmap_max=0 puts the block on the brk heap, which fragments and grew to 4.8 GB, with _int_malloc
// at 4% of the samples). Here a freed block of at least BIG_BYTES stays mapped and the next
// request of about its size takes it back: the secvit_t step went from 964 to 864 ms (medians of
// 12, alternating processes, 2-core Xeon), with no page faults left in the step.
//
// What it does: malloc, calloc, memalign, aligned_alloc and posix_memalign of at least BIG_BYTES
// (alignment at most 2 MiB) get a 2 MiB-aligned private anonymous mapping advised for transparent
// huge pages, or a cached idle one whose size is within 1/8 above the request (the smallest such).
// free of such a block marks it idle; idle blocks beyond a quarter of the physical memory (or
// $SECVIT_JAX_BUFFER_CACHE_MB) are unmapped, least recently freed first. realloc and
// malloc_usable_size know the blocks; every other pointer and every smaller request goes to glibc (its __libc_* entry points). calloc of a
// reused block zeroes it. A lock guards the table; fork takes it so a child never inherits it held.
//
// Blocks are told apart by address: each is 2 MiB-aligned and in the table, and glibc never returns
// an address inside a mapping of ours, so a free of glibc's pointers costs one mask test (a lookup
// only for the rare 2 MiB-aligned one).

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

extern void *__libc_malloc(size_t size);
extern void __libc_free(void *pointer);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *pointer, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);

#define BIG_BYTES ((size_t)64 << 20)
#define HUGE_PAGE ((size_t)2 << 20)
#define SLOTS 64

typedef struct {
  char *start;       // NULL: slot unused.
  size_t capacity;   // A multiple of HUGE_PAGE.
  int live;          // Handed out; otherwise idle in the cache.
  uint64_t freed_at; // Order of the frees, for eviction.
} Block;

static Block blocks[SLOTS];
static size_t idle_bytes;
static size_t idle_limit;
static uint64_t frees;
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static size_t (*libc_usable_size)(void *);

static void lock(void) { pthread_mutex_lock(&table_lock); }
static void unlock(void) { pthread_mutex_unlock(&table_lock); }

__attribute__((constructor)) static void initialize(void) {
  const char *megabytes = getenv("SECVIT_JAX_BUFFER_CACHE_MB");
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (megabytes != NULL && *megabytes != '\0')
    idle_limit = (size_t)strtoull(megabytes, NULL, 10) << 20;
  else
    idle_limit = pages > 0 && page > 0 ? (size_t)pages * (size_t)page / 4 : (size_t)4 << 30;
  libc_usable_size = (size_t (*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  pthread_atfork(lock, unlock, unlock);
}

// The slot of the live block starting at `pointer`, or -1. Call with the lock held.
static int live_slot(const void *pointer) {
  for (int i = 0; i < SLOTS; ++i)
    if (blocks[i].start == pointer && blocks[i].live) return i;
  return -1;
}

static int maybe_ours(const void *pointer) {
  return pointer != NULL && ((uintptr_t)pointer & (HUGE_PAGE - 1)) == 0;
}

// Unmaps the least recently freed idle block; 0 if there is none. Call with the lock held.
static int evict_oldest(void) {
  int oldest = -1;
  for (int i = 0; i < SLOTS; ++i)
    if (blocks[i].start && !blocks[i].live &&
        (oldest < 0 || blocks[i].freed_at < blocks[oldest].freed_at))
      oldest = i;
  if (oldest < 0) return 0;
  munmap(blocks[oldest].start, blocks[oldest].capacity);
  idle_bytes -= blocks[oldest].capacity;
  blocks[oldest].start = NULL;
  return 1;
}

static char *map_block(size_t capacity) {
  // One huge page more than needed, trimmed to a 2 MiB-aligned start.
  char *raw = mmap(NULL, capacity + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
  if (raw == MAP_FAILED) return NULL;
  char *start = (char *)(((uintptr_t)raw + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
  if (start > raw) munmap(raw, (size_t)(start - raw));
  size_t tail = (size_t)(raw + capacity + HUGE_PAGE - (start + capacity));
  if (tail) munmap(start + capacity, tail);
  madvise(start, capacity, MADV_HUGEPAGE);
  return start;
}

// A block of at least `size` bytes (size >= BIG_BYTES), NULL with errno ENOMEM if none; `reused`
// says whether it held data before (calloc must then zero it).
static void *big_alloc(size_t size, int *reused) {
  if (size > SIZE_MAX - 2 * HUGE_PAGE) {
    errno = ENOMEM;
    return NULL;
  }
  size_t capacity = (size + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
  lock();
  int best = -1;
  for (int i = 0; i < SLOTS; ++i)
    if (blocks[i].start && !blocks[i].live && blocks[i].capacity >= capacity &&
        blocks[i].capacity - capacity <= capacity / 8 &&
        (best < 0 || blocks[i].capacity < blocks[best].capacity))
      best = i;
  if (best >= 0) {
    blocks[best].live = 1;
    idle_bytes -= blocks[best].capacity;
    unlock();
    *reused = 1;
    return blocks[best].start;
  }
  int slot = -1;
  for (int i = 0; i < SLOTS && slot < 0; ++i)
    if (!blocks[i].start) slot = i;
  if (slot < 0 && evict_oldest()) {  // Table full: the oldest idle block makes room.
    for (int i = 0; i < SLOTS && slot < 0; ++i)
      if (!blocks[i].start) slot = i;
  }
  if (slot < 0) {  // Every slot live: glibc serves it, as without the cache.
    unlock();
    *reused = 0;
    return __libc_malloc(size);
  }
  blocks[slot].start = (char *)1;  // Reserved while mapping outside the lock.
  blocks[slot].live = 1;
  unlock();
  char *start = map_block(capacity);
  lock();
  blocks[slot].start = start;
  blocks[slot].capacity = capacity;
  unlock();
  *reused = 0;
  if (start == NULL) errno = ENOMEM;
  return start;
}

void *malloc(size_t size) {
  int reused;
  return size >= BIG_BYTES ? big_alloc(size, &reused) : __libc_malloc(size);
}

void free(void *pointer) {
  if (maybe_ours(pointer)) {
    lock();
    int slot = live_slot(pointer);
    if (slot >= 0) {
      blocks[slot].live = 0;
      blocks[slot].freed_at = ++frees;
      idle_bytes += blocks[slot].capacity;
      while (idle_bytes > idle_limit && evict_oldest()) {
      }
      unlock();
      return;
    }
    unlock();
  }
  __libc_free(pointer);
}

void *calloc(size_t count, size_t size) {
  if (size != 0 && count > SIZE_MAX / size) {
    errno = ENOMEM;
    return NULL;
  }
  if (count * size < BIG_BYTES) return __libc_calloc(count, size);
  int reused;
  void *pointer = big_alloc(count * size, &reused);
  if (pointer != NULL && reused) memset(pointer, 0, count * size);  // Fresh mappings are zero.
  return pointer;
}

void *memalign(size_t alignment, size_t size) {
  int reused;
  if (size >= BIG_BYTES && alignment <= HUGE_PAGE) return big_alloc(size, &reused);
  return __libc_memalign(alignment, size);
}

void *aligned_alloc(size_t alignment, size_t size) { return memalign(alignment, size); }

int posix_memalign(void **out, size_t alignment, size_t size) {
  if (alignment < sizeof(void *) || (alignment & (alignment - 1)) != 0) return EINVAL;
  void *pointer = memalign(alignment, size);
  if (pointer == NULL && size != 0) return ENOMEM;
  *out = pointer;
  return 0;
}

// The capacity of our live block at `pointer`, or 0 if it is not one.
static size_t our_capacity(void *pointer) {
  if (!maybe_ours(pointer)) return 0;
  lock();
  int slot = live_slot(pointer);
  size_t capacity = slot >= 0 ? blocks[slot].capacity : 0;
  unlock();
  return capacity;
}

void *realloc(void *pointer, size_t size) {
  size_t capacity = our_capacity(pointer);
  if (capacity == 0) return __libc_realloc(pointer, size);
  if (size == 0) {
    free(pointer);
    return NULL;
  }
  void *moved = malloc(size);
  if (moved == NULL) return NULL;  // The old block stays valid, as realloc promises.
  memcpy(moved, pointer, capacity < size ? capacity : size);
  free(pointer);
  return moved;
}

void *reallocarray(void *pointer, size_t count, size_t size) {
  if (size != 0 && count > SIZE_MAX / size) {
    errno = ENOMEM;
    return NULL;
  }
  return realloc(pointer, count * size);
}

size_t malloc_usable_size(void *pointer) {
  size_t capacity = our_capacity(pointer);
  if (capacity != 0) return capacity;
  return pointer != NULL && libc_usable_size != NULL ? libc_usable_size(pointer) : 0;
}
