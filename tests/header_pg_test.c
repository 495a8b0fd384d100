/* SPDX-License-Identifier: MIT */
/* deliveryevents_pg.h must compile on its own, first in a translation
 * unit, with strict flags, as C and as C++ (see `make check-pg`). */
#include "deliveryevents_pg.h"

int main(void)
{
    de_err (*open_pg)(PGconn *, const de_conf *, de_outbox **) =
        de_outbox_open_pg;
    de_err (*relay_pg)(const char *, const de_conf *, de_relay **) =
        de_relay_start_pg;
    de_err (*consumer_pg)(PGconn *, const de_conf *, de_consumer **) =
        de_consumer_open_pg;
    de_err (*on_type_pg)(de_consumer *, const char *, de_handler_pg_fn,
                         void *) = de_consumer_on_type_pg;

    return open_pg == 0 || relay_pg == 0 || consumer_pg == 0 || on_type_pg == 0;
}
