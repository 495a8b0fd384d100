/* SPDX-License-Identifier: MIT */
/*
 * driver.c -- runs a fuzz target over files, without libFuzzer: how `make
 * check` replays the seed corpus and every input that ever crashed
 * (fuzz/regressions/), with the normal compiler and sanitizer builds.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf;
    long n;

    if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 ||
        fseek(f, 0, SEEK_SET) != 0) {
        fprintf(stderr, "%s: cannot read\n", path);
        if (f)
            fclose(f);
        return 1;
    }
    buf = malloc((size_t)n + 1);
    if (buf == NULL || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "%s: cannot read\n", path);
        fclose(f);
        free(buf);
        return 1;
    }
    fclose(f);
    LLVMFuzzerTestOneInput(buf, (size_t)n);
    free(buf);
    return 0;
}

int main(int argc, char **argv)
{
    int fail = 0, files = 0;

    for (int i = 1; i < argc; i++) {
        struct stat sb;
        DIR *d;
        struct dirent *e;
        char path[4096];

        if (stat(argv[i], &sb) != 0)
            continue; /* an absent directory: nothing to replay */
        if (!S_ISDIR(sb.st_mode)) {
            fail |= run_file(argv[i]);
            files++;
            continue;
        }
        if ((d = opendir(argv[i])) == NULL)
            return 1;
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.')
                continue;
            snprintf(path, sizeof path, "%s/%s", argv[i], e->d_name);
            fail |= run_file(path);
            files++;
        }
        closedir(d);
    }
    printf("%s: %d inputs replayed\n", argv[0], files);
    return fail;
}
