/* SPDX-License-Identifier: MIT */
/* The public header must compile on its own, first in a translation unit,
 * with strict flags, as C and as C++ (see `make check-header`). */
#include "deliveryevents.h"

int main(void)
{
    de_err (*record)(de_outbox *, const de_event *, de_recorded *) = de_record;
    return record == 0 || de_version() == 0;
}
